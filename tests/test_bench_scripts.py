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
