"""The benchmark scripts start: every ``bench/*.py`` answers ``--help`` (imports resolve, arguments
parse) and every ``bench/*.sh`` parses (``bash -n``). The GPU ones run only on a lent GPU machine,
whose short lease a broken script would waste."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")  # common.py: a module


@pytest.mark.parametrize("script", SCRIPTS)
def test_python_script_answers_help(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                         timeout=300, cwd=BENCH.parent)
    assert out.returncode == 0 and "usage:" in out.stdout, f"{script}:\n{out.stdout[-1000:]}\n{out.stderr[-2000:]}"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_shell_script_parses(script):
    out = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{script}: {out.stderr}"
