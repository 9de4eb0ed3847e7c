"""The benchmark scripts start: every ``bench/*.py`` answers ``--help`` (imports resolve, arguments
parse) and every ``bench/*.sh`` parses (``bash -n``). The GPU ones run only on a lent GPU machine,
whose short lease a broken script would waste."""
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")  # common.py: a module


@pytest.mark.parametrize("script", SCRIPTS)
def test_python_script_answers_help(script, monkeypatch, capsys):
    # in this process (torch is imported already): run as __main__ with --help, as `python bench/X.py --help`
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--help"])
    monkeypatch.syspath_prepend(str(BENCH))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None) and "usage:" in out, f"{script}: exit {exit_info.value.code}\n{out[-1000:]}"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_shell_script_parses(script):
    out = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{script}: {out.stderr}"


def test_ablation_builds_of_step_phases_compile(tmp_path):
    """bench/step_phases.py rebuilds the CPU kernels with -DDIST8_ABLATE_ENCODE/-DDIST8_ABLATE_DECODE;
    a change to the block pipeline must keep those builds compiling (syntax and templates, one block
    file, this machine's vector path)."""
    from torch.utils import cpp_extension

    from dist8.kernels import build

    csrc = build.csrc_dir()
    includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), csrc / "cpu", csrc / "include")]
    flags = [f for f in build.cpu_compile_flags() if f != "-fopenmp"]
    out = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", *flags, "-DDIST8_ABLATE_ENCODE",
                          "-DDIST8_ABLATE_DECODE", *includes, str(csrc / "cpu" / "blocks_adam_cpu.cpp")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_machine_record_names_the_cpu_generation(monkeypatch):
    """A VM's model name ("AMD EPYC") hides which CPU ran a benchmark, and the CPU speed line
    differs by generation, so the record carries cpuid's family and model and, for the CPUs
    measured so far, the generation's name (BENCHMARKS.md sections 13-18)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    measured = {(23, 49): "Zen 2", (25, 1): "Zen 3", (25, 17): "Zen 4", (26, 2): "Zen 5"}
    for (family, model), name in measured.items():
        assert common.cpu_generation("AuthenticAMD", family, model) == name
    assert common.cpu_generation("GenuineIntel", 6, 207) == "Emerald Rapids"  # the H200 host of section 18
    assert common.cpu_generation("GenuineIntel", 6, 167) == "Rocket Lake"  # the dev VM of section 19
    assert common.cpu_generation("GenuineIntel", 6, 151) is None  # a client core (Alder Lake): not named
    line = common.machine()["cpuid"]
    assert line is None or " family " in line


def test_step_benchmark_shuffles_each_round_and_frees_each_size_first(monkeypatch):
    """bench/step.py times its candidates in a new order every round (in one fixed order a candidate always
    ran after the same one, and a 2-core VM's rows moved by a quarter with it: BENCHMARKS.md section 19),
    the same orders in every run, and drops one size's candidates (each holds its own parameters, gradients
    and state: gigabytes at 64M) before it builds the next size's -- an order list kept them alive and the
    run was killed for memory."""
    import argparse
    import gc
    import weakref

    monkeypatch.syspath_prepend(str(BENCH))
    import step

    calls, alive = [], []

    class Held:  # stands for a candidate's tensors
        pass

    def fake_candidates(n, dtype, device, which, size_label=""):
        gc.collect()
        assert not any(ref() is not None for ref in alive), "the previous size's candidates are still held"
        cands = {}
        for name in ("a", "b", "c", "d"):
            held = Held()
            alive.append(weakref.ref(held))
            cands[name] = ((lambda name=name, held=held: calls.append((size_label, name))), 1, None)
        return cands

    monkeypatch.setattr(step, "candidates", fake_candidates)
    monkeypatch.setattr(step, "copy_bandwidth", lambda device: 1.0)
    args = argparse.Namespace(device="cpu", sizes="1M,2M", dtypes="fp32", only="", warmup=1, reps=6)
    step.run(args)
    rounds = [tuple(name for _, name in calls[4 + 28 * size + 4 * r: 4 + 28 * size + 4 * r + 4]) for size in (0,)
              for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c", "d"] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
    first = list(calls)
    calls.clear()
    alive.clear()
    step.run(args)
    assert calls == first  # seeded: every run times the same orders


def test_deadband_benchmark_shows_round_to_nearest_lagging_where_stochastic_rounding_follows(tmp_path):
    sys.path.insert(0, str(BENCH))
    import deadband

    rows = deadband.ema_rows(120)
    last = {r["rounding"]: r["m at 119"] for r in rows if r["beta"] == 0.99 and r["s"] == 0.3}
    assert abs(last["stochastic"] - last["float64"]) < 0.01 * abs(last["float64"]), last  # follows
    assert abs(last["round-to-nearest"] - last["float64"]) > 0.5 * abs(last["float64"]), last  # lags
    lion = deadband.optimizer_rows(120)[0]
    assert lion["case"].startswith("Lion") and lion["dist8 8-bit"] == lion["bitsandbytes 8-bit"], lion
