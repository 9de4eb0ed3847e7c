"""Every command in README.md's code blocks runs as written, so the README cannot rot.

Each shell command of a ```bash block must match exactly one rule below (a new command
without a rule fails ``test_every_readme_command_has_a_rule``). Training commands run as
written with a tiny model and a few steps appended as ``--set`` overrides (later ``--set``s
win); everything else is unchanged. What is not run, and why:

* the two fresh-machine set-up commands: their ``pip install`` parts are not run (the test
  must not reinstall the environment it runs in); their package lists are checked instead,
  and the main job they end with is run. The test command's ``python -m pytest -q`` is the
  suite this file belongs to; ``.ci/run`` must run exactly that command.
* ``sbatch``: no SLURM here. A stand-in ``sbatch``/``srun``/``scontrol`` runs the batch
  script on this machine as a one-node allocation.
* the multi-node line runs as two local "nodes" (``NODE_RANK=0`` and ``1``) with
  ``MASTER_ADDR=127.0.0.1`` instead of the README's example address.
* benchmark commands take minutes (``bench/run_all.py --quick``: about 8); the scripts must
  exist and accept the flags shown.
* ``dist8 ckpt consolidate .../step-00001000``: the shortened main job's last step replaces
  step 1000.

Python blocks: the Usage block runs and must print the number its comment states; the
others are fragments (they need a model, a process group or DeepSpeed) whose calls are
exercised by the tests named in ``PYTHON_FRAGMENTS``.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import REPO, child_env, free_port

README = REPO / "README.md"
STEPS = 4
# Appended to every training command: a ~1 s run per rank that still checkpoints and plots.
SHORT = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=32", "data.max_bytes=60000",
         f"train.steps={STEPS}", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2",
         "train.eval_batches=1", "train.log_every=1", "checkpoint.every=2"]


def code_blocks(lang: str) -> list[str]:
    text = README.read_text()
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)]


def shell_commands() -> list[str]:
    """The commands of the README's bash blocks, comments stripped, continuation lines joined."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # comments (no command here quotes a '#')
            if line:
                commands.append(line)
    return commands


# ---- the rules: (name, pattern); every README command matches exactly one ----------------------------------------
RULES = [
    ("setup-main", r"^python -m pip install .* && dist8 train .*$"),
    ("setup-tests", r"^python -m pip install .* && python -m pytest -q$"),
    ("train", r"^(dist8 train|torchrun .*-m dist8\.train) "),
    ("launch", r"^(\S+=\S+ )*launch/(torchrun|deepspeed)\.sh\b"),
    ("multinode", r"^(\S+=\S+ )*launch/multinode\.sh\b"),
    ("sbatch", r"^sbatch launch/slurm\.sbatch\b"),
    ("ckpt", r"^dist8 ckpt (info|verify|consolidate) "),
    ("bench", r"^(python bench/\S+\.py|bash bench/\S+\.sh)\b"),
]
PYTHON_FRAGMENTS = {
    "ShardedOptimizer(": "tests/test_sharded.py, tests/test_checkpoint.py",
    "GradScaler": "tests/test_optim_amp.py",
    "def configure_optimizers(": "tests/test_lightning.py",
    "ShardedStateDictCallback": "tests/test_hf_trainer.py::test_hf_trainer_ddp_with_sharded_optimizer_resumes_bitwise",
    "fsdp.fully_shard": "tests/test_fsdp.py, tests/test_tensor_parallel.py, tests/test_checkpoint_fsdp.py",
    "d8ds.initialize": "tests/test_deepspeed.py",
    "transformers.Trainer(": "tests/test_hf_trainer.py::test_hf_trainer_save_and_resume_bitwise",
    "GradientReleaseCallback": "tests/test_hf_trainer.py::test_hf_trainer_gradient_release_callback_is_the_normal_step_and_resumes_bitwise",
    '"type": "dist8.AdamW8bit"': "tests/test_hf_trainer.py::test_hf_trainer_with_a_deepspeed_config_naming_dist8_resumes_exactly",
    "GlobalOptimManager": "tests/test_bnb_parity.py",
    "accelerator.prepare(": "tests/test_clients.py::test_accelerate_fsdp2_optimizer_built_before_sharding",
    "import dist8.integrations.deepspeed  # installs": "tests/test_deepspeed_hint.py",
    "checkpoint.stateful.Stateful": "tests/test_clients.py::test_dcp_stateful_fsdp2_2_to_1",
    "ZeroRedundancyOptimizer(": "tests/test_clients.py::test_zero_redundancy_optimizer_bitwise_and_consolidated_state_loads",
    "dist8.cast_model(": "tests/test_cast_model.py, tests/test_gradient_release.py, tests/test_master_weights.py",
    "load_fp32_weights(": "tests/test_sharded_master.py::test_consolidate_fp32_weights_and_load_them_back",
    "from_torch_optim(": "tests/test_from_torch.py",
}


def rule_of(command: str) -> list[str]:
    return [name for name, pattern in RULES if re.search(pattern, command)]


def test_every_readme_command_has_a_rule():
    commands = shell_commands()
    assert len(commands) >= 10, commands
    for command in commands:
        assert len(rule_of(command)) == 1, f"README command needs exactly one rule in {__file__}: {command!r} -> {rule_of(command)}"
    blocks = code_blocks("python")
    assert "opt.state_nbytes()" in blocks[0]
    for block in blocks[1:]:
        assert [k for k in PYTHON_FRAGMENTS if k in block], f"a README Python block that is neither run nor mapped to its tests:\n{block}"


def _pip_parts(command: str) -> list[list[str]]:
    return [shlex.split(part) for part in command.split(" && ") if part.startswith("python -m pip install")]


def test_setup_commands_install_what_they_need():
    """The two set-up commands pin torch, install the extras they need (matplotlib for the plot), and
    .ci/run runs the same test command."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    setup = {rule_of(c)[0]: c for c in shell_commands() if rule_of(c)[0].startswith("setup-")}
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, command in setup.items():
        first, second = _pip_parts(command)
        assert "torch==2.13.0" in first, "a bare torch pulls a CUDA build"
        assert "--no-build-isolation" in second
        target = second[-1]
        assert target.startswith(".["), target
        wanted = {"setup-main": {"plot"}, "setup-tests": {"test", "deepspeed"}}[name]
        assert set(target[2:-1].split(",")) == wanted, target
        installed = {pkg for extra in wanted for pkg in extras[extra]}
        if name == "setup-main":
            assert "matplotlib" in installed  # the job's PNG
        else:
            assert {"pytest", "pytest-timeout", "matplotlib"} <= {re.split(r"[<>=]", p)[0] for p in installed}
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python ")]
    assert len(ci) == 1 and ci[0].replace(" -q install", " install").replace("install -q ", "install ") == \
        setup["setup-tests"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A scratch directory holding configs/ and launch/ (the commands' relative paths), and the environment:
    this checkout's dist8 first on PYTHONPATH; ``dist8``, ``torchrun``, ``sbatch``, ``srun``, ``scontrol``
    on PATH as stand-ins that run this interpreter."""
    work = tmp_path_factory.mktemp("readme")
    for sub in ("configs", "launch"):
        shutil.copytree(REPO / sub, work / sub)
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    py = shlex.quote(sys.executable)
    shims = {
        "dist8": f'exec {py} -m dist8 "$@"',
        "torchrun": f'exec {py} -m torch.distributed.run "$@"',
        "python": f'exec {py} "$@"',
        # SLURM stand-ins: a one-node allocation on this machine.
        "sbatch": 'script="$1"; shift; export SLURM_JOB_NODELIST=localhost SLURM_JOB_NUM_NODES=1 '
                  'SLURM_JOB_ID=1 SLURM_GPUS_ON_NODE=1; exec bash "$script" "$@"',  # MASTER_PORT: _sh
        "scontrol": "echo 127.0.0.1",
        "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
    }
    for name, body in shims.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    return work, env


def _sh(command: str, work: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    # A port chosen now, not when the fixture was built: minutes of other tests' traffic lie between.
    result = subprocess.run(["bash", "-c", command], cwd=work, env={**env, "MASTER_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}" \
                                   f"\n--- stderr\n{result.stderr[-5000:]}"
    return result


def _shortened(command: str, own_dirs: str | None) -> str:
    sets = list(SHORT)
    if own_dirs:  # later training commands keep out of the main job's checkpoints, which `dist8 ckpt` reads
        sets += [f"checkpoint.dir={own_dirs}/ckpt", f"output.dir={own_dirs}/out"]
    return command + "".join(f" --set {s}" for s in sets)


def test_readme_commands_run_as_written(workdir):
    work, env = workdir
    ran = []
    for i, command in enumerate(shell_commands()):
        rule = rule_of(command)[0]
        if rule == "setup-main":  # install: checked above; then the main job
            job = command.split(" && ")[-1]
            result = _sh(_shortened(job, None), work, env)
            assert (work / "runs" / "tiny-gpt" / "adamw8bit" / "training.png").read_bytes()[:4] == b"\x89PNG"
            assert "plot: runs/tiny-gpt/adamw8bit/training.png" in result.stdout
            assert (work / "checkpoints" / "tiny-gpt" / "adamw8bit" / f"step-{STEPS:08d}").is_dir()
        elif rule == "setup-tests":
            continue  # the suite itself; test_setup_commands_install_what_they_need checks .ci/run runs it
        elif rule in ("train", "launch", "sbatch"):
            _sh(_shortened(command, f"cmd{i}"), work, env)
        elif rule == "multinode":
            port = free_port()
            cmds = [_shortened(command.replace("NODE_RANK=0", f"NODE_RANK={rank}")
                               .replace("MASTER_ADDR=10.0.0.1", f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}"),
                               f"cmd{i}") for rank in (0, 1)]
            procs = [subprocess.Popen(["bash", "-c", c], cwd=work, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for c in cmds]
            for c, p in zip(cmds, procs):
                out, err = p.communicate(timeout=600)
                assert p.returncode == 0, f"{c}\n{out[-2000:]}\n{err[-4000:]}"
        elif rule == "ckpt":
            result = _sh(command.replace("step-00001000", f"step-{STEPS:08d}"), work, env)
            assert "error" not in result.stderr
        elif rule == "bench":
            words = shlex.split(command)
            script = REPO / words[1]
            assert script.is_file(), script
            source = script.read_text()
            for flag in (w for w in words[2:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"{script.name} has no {flag} option"
            continue
        ran.append(rule)
    assert {"setup-main", "train", "launch", "multinode", "sbatch", "ckpt"} <= set(ran)


def test_usage_block_prints_what_its_comment_says(workdir):
    work, env = workdir
    block = code_blocks("python")[0]
    claimed = re.search(r"print\(opt\.state_nbytes\(\)\)\s+#\s*(\d+)", block)
    assert claimed, "the Usage block's print must state its output"
    result = _sh(f"{shlex.quote(sys.executable)} -c {shlex.quote(block)}", work, env)
    assert result.stdout.split() == [claimed.group(1)]


def test_public_optimizers_show_and_document_every_argument():
    """help(dist8.AdamW8bit) etc.: the real signature (no ``*a, **kw``) and a line for every argument."""
    import inspect

    from dist8.optim import OPTIMIZERS

    for name, cls in OPTIMIZERS.items():
        params = inspect.signature(cls).parameters
        assert not [p for p in params.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)], name
        assert {"lr", "block_size", "overrides", "on_nonfinite", "check_finite"} <= set(params), name
        doc = inspect.getdoc(cls)
        undocumented = [p for p in params if not re.search(rf"^\s*{p}( \(|:)", doc, flags=re.M)]
        assert not undocumented, f"{name} does not document {undocumented}"


# The only *args / **kwargs allowed in public signatures, each a documented pass-through whose
# arguments belong to another callable: (module, name) -> the variadic parameters' names.
VARIADIC_PASS_THROUGHS = {
    # **defaults go to optimizer_class(...): lr, betas, ... depend on which dist8 optimizer is wrapped
    ("dist8", "ShardedOptimizer"): {"defaults"},
    # **kwargs go to torch.distributed.fsdp.fully_shard (mesh, mp_policy, ...), whose options torch owns
    ("dist8.integrations.fsdp", "fully_shard"): {"kwargs"},
    # *args/**kwargs go to deepspeed.initialize (model, optimizer, ...), whose signature changes with DeepSpeed
    ("dist8.integrations.deepspeed", "initialize"): {"args", "kwargs"},
}


def test_public_api_shows_and_documents_every_argument():
    """help() of every public function and class: the real signature (``*args``/``**kwargs`` only for the
    documented pass-throughs above) and a docstring line for every argument (``name (type): ...`` or
    ``name: ...``). The optimizer classes are checked by the test above."""
    import importlib
    import inspect

    from dist8.optim import OPTIMIZERS

    optimizers = set(OPTIMIZERS.values())
    checked, problems = set(), []
    for module_name in ("dist8", "dist8.checkpoint", "dist8.nn", "dist8.integrations.fsdp",
                        "dist8.integrations.hf_trainer", "dist8.integrations.lightning",
                        "dist8.integrations.deepspeed"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if (inspect.ismodule(obj) or not callable(obj) or obj in optimizers
                    or (inspect.isclass(obj) and issubclass(obj, BaseException))
                    or not re.match(r"dist8(\.|$)", getattr(obj, "__module__", None) or "")):
                continue
            where = f"{module_name}.{name}"
            params = inspect.signature(obj).parameters
            variadic = {p for p, v in params.items() if v.kind in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
            if not variadic <= VARIADIC_PASS_THROUGHS.get((module_name, name), set()):
                problems.append(f"{where}: *args/**kwargs hide the signature from help(): {sorted(variadic)}")
            doc = inspect.getdoc(obj) or ""
            undocumented = [p for p in params if p != "self"
                            and not re.search(rf"^\s*\*{{0,2}}{p}( \(|:)", doc, flags=re.M)]
            if undocumented:
                problems.append(f"{where} does not document {undocumented}")
            checked.add(where)
    assert not problems, "\n".join(problems)
    # the walk reached the objects this test is about, and no allow-list entry is stale
    assert {"dist8.nn.StableEmbedding", "dist8.checkpoint.load", "dist8.GradientRelease"} <= checked
    assert {f"{module}.{name}" for module, name in VARIADIC_PASS_THROUGHS} <= checked


def test_cli_help_and_argument_errors_do_not_import_torch():
    probe = ("import sys; from dist8.cli import main\n"
             "for argv in (['--help'], ['train', '--help'], ['train', '--bogus'], ['bogus']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=child_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "no torch", result.stdout + result.stderr
    assert "usage: dist8" in result.stdout and "unrecognized arguments: --bogus" in result.stderr


def test_rendezvous_ports_are_outside_theephemeral_port_range():
    # A port from the ephemeral range can be taken by any outgoing connection between choosing and
    # binding it; one CI run lost the sbatch command to that (a 60 s rendezvous timeout).
    from dist_utils import ephemeral_port_range
    low, high = ephemeral_port_range()
    ports = {free_port() for _ in range(20)}
    assert not any(low <= p <= high for p in ports) and len(ports) > 1
