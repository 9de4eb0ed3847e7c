"""A DeepSpeed config naming ``dist8.*``: ``import dist8.integrations.deepspeed`` is all it takes,
and without it the error says so (instead of DeepSpeed's "is not a supported DeepSpeed Optimizer").

Each case runs in a fresh interpreter: which modules are imported, and in which order, is the point.
"""
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is in the [deepspeed] extras")

ASK = ("from deepspeed.runtime.engine import DeepSpeedEngine as E\n"
       "try:\n    print('supported', E._is_supported_optimizer(None, 'dist8.AdamW8bit'))\n"
       "except ValueError as e:\n    print('error', e)\n"
       "print('adam', E._is_supported_optimizer(None, 'adam'))\n")


def _run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("order", ["dist8 first", "deepspeed first"])
def test_dist8_type_before_install_names_the_fix(order):
    imports = "import dist8\nimport deepspeed\n" if order == "dist8 first" else "import deepspeed\nimport dist8\n"
    out = _run(imports + ASK)
    assert "error" in out and "import dist8.integrations.deepspeed" in out and "install()" in out, out
    assert "adam True" in out  # DeepSpeed's own optimizers are untouched


def test_importing_the_integration_installs_the_hook():
    out = _run("import dist8.integrations.deepspeed as d8ds\nprint('installed', d8ds.is_installed())\n" + ASK)
    assert "installed True" in out and "supported True" in out and "adam True" in out, out
    out = _run("import os\nos.environ['DIST8_DEEPSPEED'] = '0'\nimport dist8.integrations.deepspeed as d8ds\n"
               "print('installed', d8ds.is_installed())\n" + ASK)
    assert "installed False" in out and "error" in out, out  # opted out: the hint still explains


def test_a_mistyped_opt_out_is_refused_naming_the_variable():
    """Before: any DIST8_DEEPSPEED but "0" installed the hook ("off" and "false" too)."""
    out = _run("import os\nos.environ['DIST8_DEEPSPEED'] = 'off'\nimport dist8.integrations.deepspeed as d8ds\n"
               "print('installed', d8ds.is_installed())\n"
               "import sys\nsys.modules.pop('dist8.integrations.deepspeed')\nos.environ['DIST8_DEEPSPEED'] = 'of'\n"
               "try:\n    import dist8.integrations.deepspeed\nexcept ValueError as e:\n    print('refused', e)\n")
    assert "installed False" in out and "refused DIST8_DEEPSPEED must be 1 or 0" in out and "got 'of'" in out, out
