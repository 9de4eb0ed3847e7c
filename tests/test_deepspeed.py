"""DeepSpeed integration: ``"type": "dist8.AdamW8bit"`` under ZeRO 0/1/2/3, offload, checkpoints, resharding.

Multi-rank runs spawn ``tests/_ds_worker.py`` on 2 (or 1) gloo ranks with the CPU
accelerator (DS_ACCELERATOR=cpu). The first DeepSpeed run on a machine JIT-builds
DeepSpeed's shm comm op (~90 s on 2 cores; cached in ~/.cache/torch_extensions).
Skipped with a reason when DeepSpeed is not installed.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist8

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _ds_worker as W  # noqa: E402
from dist_utils import free_port  # noqa: E402

try:
    import deepspeed  # noqa: F401

    HAVE_DS = True
except Exception as exc:  # noqa: BLE001
    HAVE_DS = False
    WHY = f"DeepSpeed not importable ({exc}); install with: pip install --no-build-isolation deepspeed"

needs_ds = pytest.mark.skipif(not HAVE_DS, reason="" if HAVE_DS else WHY)
if not HAVE_DS:
    print(f"tests/test_deepspeed.py: skipping: {WHY}", file=sys.stderr)

PARAMS = {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.01, "block_size": 256, "eps": "auto"}
STEPS = 20
# fp32 ZeRO vs one process: gradients are summed in another order and (for parameters split
# across ranks) blocks start at partition boundaries; measured max relative loss deviation over
# 20 steps: 5e-6 (ZeRO-0), 2e-5 (ZeRO-1/2), 8e-6 (ZeRO-3), 1.5e-3 (bf16). Tolerance: 1e-3 (bf16 2e-2).
TOL = 1e-3


def cfg(stage, **extra):
    c = {"optimizer": {"type": "dist8.AdamW8bit", "params": dict(PARAMS)}, "gradient_clipping": 1.0,
         "zero_optimization": {"stage": stage}}
    c.update(extra)
    return c


def launch(world, jobs, out_dir, timeout=300):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / f"spec-{jobs[0]['name']}.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(out_dir / f"{jobs[0]['name']}-log{r}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(HERE / "_ds_worker.py"), str(spec), str(out_dir)],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for r, (p, log) in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = "timeout"
        log.close()
        if rc != 0:
            failed.append(r)
    if failed:
        tails = [(out_dir / f"{jobs[0]['name']}-log{r}.txt").read_text()[-3000:] for r in failed]
        raise AssertionError(f"ranks {failed} failed:\n" + "\n----\n".join(tails))
    return {job["name"]: [json.loads((out_dir / f"{job['name']}-rank{r}.json").read_text()) for r in range(world)]
            for job in jobs}


def close(a, b, tol=TOL):
    return all(abs(x - y) <= tol * max(abs(y), 1e-6) for x, y in zip(a, b)) and len(a) == len(b)


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    losses, opt = W.reference(STEPS, PARAMS)
    return losses


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    if not HAVE_DS:
        pytest.skip(WHY)
    out = tmp_path_factory.mktemp("ds-stages")
    jobs = [{"name": f"z{s}", "steps": STEPS, "config": cfg(s), "via": "plain" if s == 1 else "initialize"}
            for s in (0, 1, 2, 3)]
    jobs.append({"name": "offload", "steps": STEPS,
                 "config": cfg(2, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})})
    jobs.append({"name": "offload3", "steps": 5,
                 "config": cfg(3, zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}})})
    jobs.append({"name": "client", "steps": STEPS, "via": "client", "client": {k: v for k, v in PARAMS.items() if v != "auto"},
                 "config": cfg(2, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})})
    client_kw = {k: v for k, v in PARAMS.items() if v != "auto"}
    for stage in (2, 3):  # an instance through plain deepspeed.initialize, as HF Trainer/accelerate/Lightning pass it
        jobs.append({"name": f"plain_client{stage}", "steps": STEPS, "via": "plain_client", "client": client_kw,
                     "temperature": True, "schedule": True, "config": cfg(stage)})
    jobs.append({"name": "both", "steps": 1, "via": "both", "client": client_kw, "config": cfg(2)})
    jobs.append({"name": "gas", "steps": STEPS, "config": cfg(2, gradient_accumulation_steps=2)})
    jobs.append({"name": "bf16", "steps": STEPS, "config": cfg(2, bf16={"enabled": True})})
    jobs.append({"name": "nan_lr", "steps": 3, "bad_lr": {"1": "nan"}, "config": cfg(2)})
    for stage in (2, 3):  # GlobalOptimManager.override_config after the first step (LATE)
        for key, value in LATE.items():
            jobs.append({"name": f"late_{key}{stage}", "steps": 4, "config": cfg(stage),
                         "late_override": {"step": 2, "param": LATE_PARAM, "config": {key: value}}})
    return launch(2, jobs, out)


LATE_PARAM = "blocks.0.fc.weight"  # on one rank's partition under ZeRO-2, split under ZeRO-3
LATE = {"lr": 0.0, "optim_bits": 32, "percentile_clipping": 5}


def _check_8bit(facts, replicated=False):
    for rank_facts in facts:
        assert rank_facts["class"] == "AdamW8bit" and "AdamW8bit" in rank_facts["mro"][2:], rank_facts["mro"]
        dtypes = rank_facts["dtypes"]
        assert dtypes, "no optimizer state"
        big = [n for n in dtypes if n.endswith(("qkv.weight", "fc.weight", "out.weight", "tok.weight"))]
        assert big and all(dtypes[n] == "torch.uint8" for n in big), dtypes
        small = [n for n in dtypes if n.endswith(("ln1.weight", "bias")) or n == "pos"]
        assert all(dtypes[n] == "torch.float32" for n in small), dtypes  # < min_8bit_size=4096 elements
    # 8-bit: ~2 bytes/element of state for the big matrices (vs 8 for fp32 Adam). Whole model ~110k elements.
    total = facts[0]["state_bytes"] if replicated else sum(f["state_bytes"] for f in facts)
    n_params = sum(p.numel() for p in W.make_model().parameters())
    assert total < 3.0 * n_params, (total, n_params)


@needs_ds
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_plain_dist8(stages, reference, stage):
    facts = stages[f"z{stage}"]
    losses = facts[0]["losses"]
    assert facts[1]["losses"] == losses
    assert close(losses, reference), (losses, reference)
    assert losses[-1] < 0.7 * losses[0]
    _check_8bit(facts, replicated=stage == 0)
    if stage:
        assert facts[0]["n_segments"] > 0  # per-parameter state inside DeepSpeed's flat partitions
    # DeepSpeed's ZeRO check counts dist8 as supported: no false "untested optimizer" warning
    assert all(f["zero_supported"] for f in facts), facts


@needs_ds
def test_a_bad_lr_written_into_the_groups_is_refused_naming_it(stages):
    """The segment step checks changed groups as the plain step does (before, lr = nan was taken and every
    block skipped as non-finite, counted, without a word)."""
    facts = stages["nan_lr"]
    for rank_facts in facts:
        assert rank_facts["refused"] is not None and rank_facts["refused"].startswith("lr must be a finite number")
        assert len(rank_facts["losses"]) == 1


@needs_ds
@pytest.mark.parametrize("stage", [2, 3])
def test_override_config_after_the_first_step_applies_or_is_refused_on_every_rank(stages, stage):
    """The segments had their parameters' marks copied when DeepSpeed built them: an override made after
    the first step applied on the unsharded optimizer (as in bitsandbytes) but not under DeepSpeed. One
    the state cannot follow is refused on every rank, naming the parameter (a rank holding no part of it
    went on alone into DeepSpeed's all-gather)."""
    frozen = stages[f"late_lr{stage}"]
    for rank in frozen:
        assert rank["refused"] is None and len(rank["losses"]) == 4
        assert LATE_PARAM not in rank["moved_after_override"], "lr=0 set after the first step left it moving"
        assert "blocks.0.qkv.weight" in rank["moved_after_override"]
    for key, value in LATE.items():
        if key == "lr":
            continue
        for rank in stages[f"late_{key}{stage}"]:
            assert rank["refused"] and f"parameter {LATE_PARAM} has " in rank["refused"], rank["refused"]
            assert rank["refused"].endswith("; make such a change before the first step under DeepSpeed (its "
                                            "state is kept by flat partition)")
            assert ("32-bit" if key == "optim_bits" else f"percentile_clipping={value}") in rank["refused"]
            assert len(rank["losses"]) == 2 and rank["moved_after_override"] == [], "the refused step moved"


def test_cpu_offload_uses_dist8_8bit(stages, reference):
    facts = stages["offload"]
    assert all(f["devices"] == ["cpu"] for f in facts)
    assert all(f["class"] == "AdamW8bit" and "DeepSpeedCPUAdam" not in f["mro"] for f in facts)
    _check_8bit(facts)
    assert close(facts[0]["losses"], reference)
    f3 = stages["offload3"]
    assert f3[0]["wrapper"] == "DeepSpeedZeroOptimizer_Stage3" and f3[0]["class"] == "AdamW8bit"
    assert close(f3[0]["losses"], reference[:5])


@needs_ds
def test_client_optimizer_instance(stages, reference):
    """dist8.train passes an optimizer instance: same per-parameter handling, offload allowed; DeepSpeed
    steps the instance itself (its nonfinite_skips, which the job reports, are the engine's)."""
    facts = stages["client"]
    assert facts[0]["n_segments"] > 0 and close(facts[0]["losses"], reference)
    assert all(f["client_stepped"] for f in facts), "DeepSpeed steps another optimizer than the one passed in"
    _check_8bit(facts)


@needs_ds
@pytest.mark.parametrize("stage", [2, 3])
def test_an_instance_through_plain_deepspeed_initialize_steps_like_one_process(stages, stage):
    """HF Trainer, accelerate and Lightning hand DeepSpeed their optimizer instance, with a scheduler made
    on it, through plain deepspeed.initialize. Until 2026-12-05 that instance kept its plain class: one
    8-bit state over each whole flat partition, and with two param groups (HF's decay / no-decay) its state
    freed and restarted at every step, as DeepSpeed steps one group at a time (losses 1e-2 off one process,
    a UserWarning the only sign)."""
    reference, _ = W.reference(STEPS, PARAMS, temperature=True, schedule=True)
    facts = stages[f"plain_client{stage}"]
    assert facts[0]["losses"] == facts[1]["losses"] and close(facts[0]["losses"], reference), (facts[0], reference)
    for rank_facts in facts:
        assert rank_facts["client_stepped"] and rank_facts["n_segments"] > 0
        # no state restarted (step 0: ZeRO-3's partition of the one-value group holding only padding on a rank)
        assert set(rank_facts["state_steps"]) - {0} == {STEPS}, rank_facts["state_steps"]
        assert rank_facts["lrs"] == [PARAMS["lr"] * W.SCHEDULE(STEPS)] * 2  # the scheduler drove it
    _check_8bit(facts)


@needs_ds
def test_a_config_naming_dist8_and_an_optimizer_instance_is_refused(stages):
    """DeepSpeed stepped the instance and dropped the config's dist8 section (its betas and weight decay),
    silently."""
    for rank_facts in stages["both"]:
        assert rank_facts["refused"].startswith("the DeepSpeed config names optimizer 'dist8.AdamW8bit' and an "
                                                "optimizer was passed to initialize too (AdamW8bit)")
        assert rank_facts["untouched"]


@needs_ds
def test_gradient_accumulation_and_bf16(stages, reference):
    assert close(stages["gas"][0]["losses"], reference)
    bf = stages["bf16"][0]["losses"]
    assert bf[-1] < 0.7 * bf[0] and close(bf, reference, tol=2e-2)
    _check_8bit(stages["bf16"])


@needs_ds
def test_checkpoint_same_world_size_and_reshard(stages, tmp_path):
    """2 ranks save at step 10; resume (a) with engine.load_checkpoint at 2 ranks (also without the optimizer
    states, as DeepSpeed's own AdamW), (b) converted at 1 rank."""
    full = stages["z2"][0]["losses"]
    ds_dir, conv = tmp_path / "ds", tmp_path / "d8"
    half = STEPS // 2
    torch_cfg = cfg(2, optimizer={"type": "AdamW", "params": {k: v for k, v in PARAMS.items() if k in ("lr", "betas",
                                                                                                   "weight_decay")}})
    fresh = {"steps": 3, "first_step": half, "config": cfg(2), "ds_load": str(ds_dir)}
    runs = launch(2, [{"name": "save2", "steps": half, "config": cfg(2), "save": str(ds_dir)},
                      {"name": "load2", "steps": half, "first_step": half, "config": cfg(2), "ds_load": str(ds_dir)},
                      # fine-tuning from the weights with a fresh optimizer, DeepSpeed's two ways
                      dict(fresh, name="fresh2", ds_load_kwargs={"load_optimizer_states": False}),
                      dict(fresh, name="module2", ds_load_kwargs={"load_module_only": True}),
                      # the same with DeepSpeed's own AdamW, what both must match
                      {"name": "tsave2", "steps": half, "config": torch_cfg, "save": str(tmp_path / "ds-torch")},
                      dict(fresh, name="tfresh2", config=torch_cfg, ds_load=str(tmp_path / "ds-torch"),
                           ds_load_kwargs={"load_optimizer_states": False})],
                  tmp_path)
    res = runs["load2"][0]["losses"]
    assert close(res, full[half:], tol=1e-4), (res, full[half:])
    theirs = runs["tfresh2"][0]["losses"]
    for name in ("fresh2", "module2"):
        ours = runs[name][0]["losses"]
        assert abs(ours[0] - full[half]) <= 1e-4 * full[half], (name, ours, full[half])  # the weights came back
        assert close(ours, theirs), (name, ours, theirs)  # and the optimizer started fresh, as DeepSpeed's does
        assert not close(ours[1:], res[1:3], tol=1e-3), (name, ours, res)  # (not the saved state)
    subprocess.run([sys.executable, "-m", "dist8", "ckpt", "from-deepspeed", str(ds_dir), str(conv)], check=True)
    meta = json.loads((conv / "metadata.json").read_text())
    assert meta["world_size"] == 1 and meta["optimizer"]["class"] == "AdamW8bit"
    one = launch(1, [{"name": "resume1", "steps": half, "first_step": half, "config": cfg(2), "resume": str(conv)},
                     # DeepSpeed's own loader refuses the other world size; its message now says dist8's way
                     {"name": "dsload1", "steps": 1, "config": cfg(2), "ds_load": str(ds_dir), "ds_load_refused": True}],
                 tmp_path)
    r1 = one["resume1"][0]
    assert one["dsload1"][0]["refused"].endswith(f"A dist8 optimizer's state reloads at any world size: convert with "
                                                 f"`dist8 ckpt from-deepspeed {ds_dir} OUT`, then dist8.integrations."
                                                 "deepspeed.load_dist8_checkpoint(engine, OUT).")
    assert close(r1["losses"], full[half:], tol=5e-3), (r1["losses"], full[half:])
    _check_8bit([r1])

    # 1 rank (ZeRO-3) -> 2 ranks (ZeRO-1)
    ds1, conv1 = tmp_path / "ds1", tmp_path / "d81"
    launch(1, [{"name": "save1", "steps": half, "config": cfg(3), "save": str(ds1)}], tmp_path)
    from dist8.integrations.deepspeed_convert import from_deepspeed

    from_deepspeed(ds1, conv1)
    r2 = launch(2, [{"name": "resume2", "steps": half, "first_step": half, "config": cfg(1), "resume": str(conv1)}],
                tmp_path)["resume2"]
    assert close(r2[0]["losses"], full[half:], tol=TOL), (r2[0]["losses"], full[half:])

    # the converted checkpoint also loads into a plain dist8 optimizer
    import dist8
    import dist8.checkpoint as ck

    model = W.make_model(seed=5)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=3e-3)
    ck.load(conv, model, opt)
    assert opt.state[model.blocks[0].qkv.weight]["state1"].dtype == torch.uint8


@needs_ds
def test_quant_map_travels_through_deepspeed_checkpoints(tmp_path):
    """quant_map="fp8" under ZeRO-2: `from-deepspeed` records the map (it used to write "dynamic" and read
    the codes with the dynamic map) and a run resumed from the conversion continues the saved one. (An
    engine with another map refusing the segments: tests/test_fp8_map.py, without a DeepSpeed launch.)"""
    fp8 = cfg(2)
    fp8["optimizer"]["params"]["quant_map"] = "fp8"
    ds_dir, conv = tmp_path / "ds", tmp_path / "d8"
    out = launch(1, [{"name": "fp8full", "steps": 6, "config": fp8},
                     {"name": "fp8save", "steps": 3, "config": fp8, "save": str(ds_dir)}], tmp_path)
    full = out["fp8full"][0]["losses"]
    assert out["fp8full"][0]["n_segments"] > 0  # the segmented path (raw codes in the state)
    from dist8.integrations.deepspeed_convert import from_deepspeed

    from_deepspeed(ds_dir, conv)
    assert json.loads((conv / "metadata.json").read_text())["optimizer"]["quant_map"] == "fp8"
    resumed = launch(1, [{"name": "fp8resume", "steps": 3, "first_step": 3, "config": fp8, "resume": str(conv)}],
                     tmp_path)["fp8resume"][0]["losses"]
    assert close(resumed, full[3:], tol=5e-3), (resumed, full[3:])


@needs_ds
def test_whole_parameter_sums_add_every_ranks_part_of_a_split_parameter(tmp_path):
    """LAMB/LARS trust ratios and percentile clipping's gradient norm are sums over a whole parameter; ZeRO
    splits parameters across ranks' partitions, and each rank stepped its part from its own part's sums (a
    64x64 weight halved: 0.14x and 1.4x the unsharded LAMB update), silently. Each step now adds every rank's
    part in one all-reduce over DeepSpeed's data-parallel group. Compared with one process on the full batch,
    32-bit state (8-bit state's blocks start at partition edges, see TOL), 3 steps at lr 1e-2: every
    parameter's distance ||w - w_ref|| / ||w_ref - w_0|| <= 1e-4 (measured <= 1.2e-5; each rank's own
    sums: LAMB 2.3e-3 under ZeRO-2 and 6e-2 under ZeRO-3, LARS 1.4e-2 under ZeRO-1). Not the q/k/v bias:
    the key bias's gradient is zero in exact arithmetic, so its Adam-like update is rounding noise that any
    change of summation order moves (5e-3)."""
    from safetensors.torch import load_file

    runs = {"lamb2": ("LAMB8bit", 2), "lamb3": ("LAMB8bit", 3), "lars1": ("LARS8bit", 1)}
    params = {"LAMB8bit": {"lr": 1e-2, "percentile_clipping": 90, "optim_bits": 32},
              "LARS8bit": {"lr": 1e-2, "momentum": 0.9, "percentile_clipping": 90, "optim_bits": 32}}
    jobs = [{"name": name, "steps": 3, "weights_out": True,
             "config": cfg(stage, optimizer={"type": f"dist8.{cls}", "params": params[cls]})}
            for name, (cls, stage) in runs.items()]
    out = launch(2, jobs, tmp_path)
    start = {n: p.detach() for n, p in W.make_model().named_parameters()}
    for name, (cls, stage) in runs.items():
        assert out[name][0]["n_segments"] > 0, name  # the segmented path
        _, ref_opt = W.reference(3, params[cls], cls_name=cls)
        ref = {ref_opt.param_names[p]: p.detach() for g in ref_opt.param_groups for p in g["params"]}
        got = load_file(tmp_path / f"{name}-weights.safetensors")
        far = {n: float((got[n] - ref[n]).norm() / (ref[n] - start[n]).norm()) for n in got
               if not n.endswith("qkv.bias")}
        assert max(far.values()) <= 1e-4, (name, sorted(far.items(), key=lambda kv: -kv[1])[:4])


@needs_ds
def test_a_param_group_whose_partition_on_a_rank_is_only_padding(tmp_path):
    """A one-value parameter in its own param group (CLIP's logit_scale, a temperature): under ZeRO-1/2 on 2
    ranks one rank's partition of that group holds only padding. ZeRO-1/2 steps the optimizer once per group,
    and the whole-parameter sums' slots for such partitions were keyed by their place in param_groups, which
    that changes: a KeyError on that rank, the other left waiting (plain AdamW8bit too). Both run now and match
    one process with the same two groups (32-bit state, as above)."""
    from safetensors.torch import load_file

    runs = {"adamw2": ("AdamW8bit", 2), "lamb1": ("LAMB8bit", 1)}
    params = {"AdamW8bit": {"lr": 1e-2, "optim_bits": 32},
              "LAMB8bit": {"lr": 1e-2, "percentile_clipping": 90, "optim_bits": 32}}
    jobs = [{"name": name, "steps": 3, "weights_out": True, "temperature": True,
             "config": cfg(stage, optimizer={"type": f"dist8.{cls}", "params": params[cls]})}
            for name, (cls, stage) in runs.items()]
    out = launch(2, jobs, tmp_path)
    start = {n: p.detach() for n, p in W.make_model(temperature=True).named_parameters()}
    for name, (cls, _) in runs.items():
        _, ref_opt = W.reference(3, params[cls], cls_name=cls, temperature=True)
        ref = {ref_opt.param_names[p]: p.detach() for g in ref_opt.param_groups for p in g["params"]}
        got = load_file(tmp_path / f"{name}-weights.safetensors")
        assert not torch.equal(got["temperature"], start["temperature"]), name  # trained
        far = {n: float((got[n] - ref[n]).norm() / (ref[n] - start[n]).norm()) for n in got
               if not n.endswith("qkv.bias")}
        assert max(far.values()) <= 1e-4, (name, sorted(far.items(), key=lambda kv: -kv[1])[:4])


@needs_ds
def test_torch_autocast_fp16_unscales_and_skips_an_overflowing_step_as_torch_does(tmp_path):
    """DeepSpeed's ``torch_autocast`` with fp16 under ZeRO scales the loss with a torch GradScaler and steps
    through ``scaler.step(optimizer)``, which (dist8 declaring ``_step_supports_amp_scaling``) leaves the
    gradients scaled and hands the scale to dist8's step on the flat partitions. dist8's 32-bit SGD with
    momentum against torch's SGD in the same configuration, with a step whose loss is multiplied by 1e30 (its
    fp16 gradients overflow; DeepSpeed skips it): the same weights. SGD moves by lr times the gradient, so a
    scale left in (65536) or an overflow stepped shows at once. Measured: every parameter within 1.7e-6 (distance /
    update) of torch's; before the segment step read the scale, 2e4 (the gradients were stepped scaled)."""
    from safetensors.torch import load_file

    sgd = {"lr": 0.05, "momentum": 0.9}
    amp = {"torch_autocast": {"enabled": True, "dtype": "torch.float16"}, "gradient_clipping": 0.0}
    jobs = []
    for stage in (2, 3):
        for via in ("initialize", "torch"):
            jobs.append({"name": f"{via}{stage}", "steps": 4, "weights_out": True, "via": via,
                         "torch": {"cls": "SGD", "kwargs": sgd}, "loss_factor": {"1": 1e30},
                         "config": cfg(stage, optimizer={"type": "dist8.SGD32bit", "params": sgd}, **amp)})
    out = launch(2, jobs, tmp_path)
    start = {n: p.detach() for n, p in W.make_model().named_parameters()}
    for stage in (2, 3):
        assert out[f"initialize{stage}"][0]["n_segments"] > 0 and out[f"torch{stage}"][0]["class"] == "SGD"
        got = load_file(tmp_path / f"initialize{stage}-weights.safetensors")
        ref = load_file(tmp_path / f"torch{stage}-weights.safetensors")
        assert all(torch.isfinite(t).all() for t in got.values()), stage
        far = {n: float((got[n] - ref[n]).norm() / (ref[n] - start[n]).norm().clamp_min(1e-12)) for n in got}
        assert max(far.values()) <= 1e-4, (stage, sorted(far.items(), key=lambda kv: -kv[1])[:4])


def test_parameters_split_where_dist8_does_not_sum_are_refused_naming_them():
    """With expert (MoE) groups, which DeepSpeed partitions over other process groups, or a parameter the
    model does not name, a split parameter whose step needs whole-parameter sums is still refused (each
    rank would decide from its own part); one kept whole is not."""
    from types import SimpleNamespace

    from dist8.integrations.deepspeed_segments import (Segment, _has_expert_groups, _refuse_whole_parameter_sums,
                                                       segmented_class)

    flat = torch.zeros(64, requires_grad=True)
    split, whole = Segment("w", 0, 32, 32, (8, 8), 64), Segment("b", 32, 32, 0, (32,), 32)
    lamb = segmented_class(dist8.LAMB8bit)([flat])
    with pytest.raises(ValueError, match=r"parameter w is split .* which LAMB8bit's trust ratio needs"):
        _refuse_whole_parameter_sums(lamb, {flat: [split, whole]}, lambda seg: True)
    _refuse_whole_parameter_sums(lamb, {flat: [whole]}, lambda seg: True)
    _refuse_whole_parameter_sums(lamb, {flat: [split, whole]}, lambda seg: False)  # summed
    _refuse_whole_parameter_sums(segmented_class(dist8.AdamW8bit)([flat]), {flat: [split]}, lambda seg: True)
    dp, expert = object(), object()
    assert _has_expert_groups(SimpleNamespace(real_dp_process_group=[dp, expert]), dp)
    assert not _has_expert_groups(SimpleNamespace(real_dp_process_group=[dp, dp]), dp)
    assert not _has_expert_groups(SimpleNamespace(), dp)


def test_fp16_unfused_fp32_copies_follow_their_parameters_marks():
    """ZeRO-0 with fp16 (GPU only: the CPU accelerator has no fp16) steps per-parameter fp32 copies, which
    were given their parameters' marks once, when DeepSpeed built them: a later override_config was not seen.
    DeepSpeed's wrapper is stood in for by its two lists."""
    from types import SimpleNamespace

    from dist8.integrations.deepspeed_segments import attach_segments, segmented_class

    mng = dist8.GlobalOptimManager.get_instance()
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)
        copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        opt = segmented_class(dist8.AdamW8bit)(copies, lr=1e-2, min_8bit_size=0)
        wrapper = SimpleNamespace(fp16_groups=[list(model.parameters())], fp32_groups=[copies])
        engine = SimpleNamespace(basic_optimizer=opt, module=model, device="cpu", optimizer=wrapper)
        attach_segments(engine)

        def step():
            for c in copies:
                c.grad = torch.randn_like(c)
            opt.step()

        step()
        mng.override_config(model.weight, "lr", 0.0)
        frozen, moving = copies[0].detach().clone(), copies[1].detach().clone()
        step()
        assert torch.equal(copies[0], frozen) and not torch.equal(copies[1], moving)
        mng.override_config(model.weight, "optim_bits", 32)
        with pytest.raises(ValueError, match=r"^parameter weight has 8-bit state but its settings now give it 32"):
            step()
    finally:
        mng.initialize()


def test_a_loaded_segment_state_is_checked_against_the_settings_at_the_next_step():
    """A state loaded into DeepSpeed's partitions (engine.load_checkpoint, load_dist8_checkpoint) met the
    settings only inside the kernels' pipeline: percentile clipping on (a mark) and a checkpoint without
    its history gave a bare KeyError 'gnorm_vec' on the ranks holding the parameter. One rank, the engine
    stood in for by what attach_segments reads (a ZeRO-1/2 partition holding both parameters)."""
    from types import SimpleNamespace

    from dist8.integrations.deepspeed_segments import attach_segments, segmented_class

    def engine_of(model):
        flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        start = 0
        for p in model.parameters():
            p._hp_mapping = SimpleNamespace(param_group_index=0, lp_fragment_address=SimpleNamespace(start=0),
                                            hp_fragment_address=SimpleNamespace(start=start, numel=p.numel()))
            start += p.numel()
        opt = segmented_class(dist8.AdamW8bit)([flat], lr=1e-2, min_8bit_size=0)
        attach_segments(SimpleNamespace(basic_optimizer=opt, module=model, device="cpu", optimizer=SimpleNamespace()))
        return flat, opt

    def step(flat, opt):
        flat.grad = torch.randn_like(flat)
        opt.step()

    mng = dist8.GlobalOptimManager.get_instance()
    try:
        torch.manual_seed(0)
        saved_flat, saved = engine_of(torch.nn.Linear(16, 16))
        step(saved_flat, saved)
        model = torch.nn.Linear(16, 16)
        mng.override_config(model.weight, "percentile_clipping", 5)
        flat, opt = engine_of(model)
        step(flat, opt)  # the mark was there from the start: the history too
        opt.load_state_dict(saved.state_dict())  # a state saved without clipping
        before = flat.detach().clone()
        with pytest.raises(ValueError, match=r"^parameter weight has percentile_clipping=5 but its state has no "
                                             r"gradient-norm history .*before the first step under DeepSpeed"):
            step(flat, opt)
        assert torch.equal(flat, before)
    finally:
        mng.initialize()


# ---- errors (no ranks needed) -------------------------------------------------------------------------
@needs_ds
def test_unknown_optimizer_name():
    import dist8.integrations.deepspeed as d8ds

    bad = cfg(2)
    bad["optimizer"]["type"] = "dist8.AdamW9bit"
    with pytest.raises(ValueError, match="unknown dist8 optimizer 'dist8.AdamW9bit'.*AdamW8bit"):
        d8ds.initialize(model=W.make_model(), config=bad)


@needs_ds
def test_unknown_param_key_names_it():
    import dist8.integrations.deepspeed as d8ds

    bad = cfg(2)
    bad["optimizer"]["params"]["lr_warmup"] = 3
    with pytest.raises(ValueError, match=r"unknown key 'lr_warmup'.*valid keys: .*lr.*betas.*min_8bit_size"):
        d8ds.initialize(model=W.make_model(), config=bad)
    bad["optimizer"]["params"] = {"max_grad_norm": 1.0}
    with pytest.raises(ValueError, match="gradient_clipping"):
        d8ds.initialize(model=W.make_model(), config=bad)


def test_auto_values_mean_defaults():
    import dist8
    from dist8.integrations.deepspeed import optimizer_kwargs

    kw = optimizer_kwargs(dist8.AdamW8bit, {"lr": "auto", "betas": [0.8, 0.9], "eps": "auto", "weight_decay": 0})
    assert kw == {"betas": (0.8, 0.9), "weight_decay": 0.0}
    assert optimizer_kwargs(dist8.Lion8bit, {"lr": 1e-4, "min_8bit_size": 0}) == {"lr": 1e-4, "min_8bit_size": 0}


def test_bad_config_values_are_one_line_naming_the_key(tmp_path):
    """The config translation refuses what it cannot use with one line naming the key or file
    (before: AttributeError on a non-dict params, "could not convert string to float" for lr,
    a bare JSONDecodeError for a broken file)."""
    import dist8
    from dist8.integrations.deepspeed_config import check_config, load_config, optimizer_kwargs

    cases = [
        ([0.9, 0.999], "optimizer.params must be a dict"),
        ({"lr": "abc"}, "optimizer.params.lr must be a number, got 'abc'"),
        ({"eps": [1e-8]}, None),  # not a number type: left for the optimizer's own check (below)
        ({"betas": "0.9,0.95"}, "optimizer.params.betas must be a list of numbers"),
        ({"betas": [0.9, None]}, "optimizer.params.betas must be a list of numbers"),
    ]
    for params, match in cases:
        if match is None:
            with pytest.raises(ValueError, match="eps must be a finite number"):
                dist8.AdamW8bit([torch.nn.Parameter(torch.zeros(4))], **optimizer_kwargs(dist8.AdamW8bit, params))
            continue
        with pytest.raises(ValueError, match=match) as info:
            check_config({"optimizer": {"type": "dist8.AdamW8bit", "params": params}})
        assert "\n" not in str(info.value)
    assert optimizer_kwargs(dist8.AdamW8bit, {"lr": "3e-4"}) == {"lr": 3e-4}  # JSON writers leave strings
    check_config({"optimizer": "adam"})  # not a dist8 section: DeepSpeed judges it
    broken = tmp_path / "ds.json"
    broken.write_text("{bad json")
    with pytest.raises(ValueError, match="ds.json is not valid JSON"):
        load_config(str(broken))
    broken.write_text("[1, 2]")
    with pytest.raises(ValueError, match="ds.json must hold a JSON object, got list"):
        load_config(broken)
    with pytest.raises(ValueError, match="missing.json: cannot read it"):
        load_config(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="must be a dict or a path"):
        load_config(42)


def test_deepspeed_missing_says_how_to_install(monkeypatch):
    import dist8.integrations.deepspeed as d8ds

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(d8ds._state, "installed", False)
    with pytest.raises(ImportError, match=r"pip install dist8\[deepspeed\]"):
        d8ds.install()


def test_import_dist8_does_not_import_deepspeed():
    code = "import sys, dist8, dist8.integrations; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_segment_in_place_keeps_settings_hooks_and_the_scheduler_made_before(monkeypatch):
    """An instance handed to DeepSpeed becomes its segmented class in place: same settings, names, hooks
    and steps (bitwise); an LR scheduler made on it before (HF Trainer's, Lightning's) keeps driving it,
    through the segmented step, without torch's "optimizer.step() has been overridden" warning."""
    import warnings

    import dist8
    from dist8.integrations.deepspeed_segments import DeepSpeedSegments, segment_in_place

    segmented_steps = []
    follow = DeepSpeedSegments.follow_marks
    monkeypatch.setattr(DeepSpeedSegments, "follow_marks", lambda self: (segmented_steps.append(1), follow(self)))
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Linear(64, 3))
    twin_model = copy.deepcopy(model)

    def make(m):
        opt = dist8.AdamW8bit(m.named_parameters(), lr=1e-2, min_8bit_size=256, overrides={"1.*": {"eps": 1e-6}})
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, W.SCHEDULE)

    client, sched = make(model)
    ref, ref_sched = make(twin_model)
    calls = []
    client.register_step_post_hook(lambda *a: calls.append(1))
    assert segment_in_place(client) is client and segment_in_place(client) is client
    assert isinstance(client, DeepSpeedSegments) and isinstance(client, dist8.AdamW8bit)
    assert type(client).__name__ == "AdamW8bit" and list(client.param_names.values()) == list(ref.param_names.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            for m in (model, twin_model):
                m.zero_grad()
                m(torch.ones(2, 80) * (step + 1)).square().sum().backward()
            client.step()
            ref.step()
            sched.step()
            ref_sched.step()
    assert calls == [1, 1, 1] and segmented_steps == [1, 1, 1]
    assert client.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 1e-2 * W.SCHEDULE(3)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@needs_ds
def test_install_is_idempotent():
    import deepspeed.runtime.engine as engine_module
    from deepspeed.runtime.engine import DeepSpeedEngine

    import dist8.integrations.deepspeed as d8ds

    d8ds.install()
    first = DeepSpeedEngine._configure_basic_optimizer
    zero_check = engine_module.is_zero_supported_optimizer
    d8ds.install()
    assert DeepSpeedEngine._configure_basic_optimizer is first and d8ds.is_installed()
    assert engine_module.is_zero_supported_optimizer is zero_check
    d8ds.uninstall()
    try:
        assert engine_module.is_zero_supported_optimizer is not zero_check  # DeepSpeed's own again
        assert DeepSpeedEngine._configure_basic_optimizer is not first
    finally:
        d8ds.install()
