"""A regular install (a wheel, ``pip install .``), not only the editable one the README uses, ships
the kernel sources and runs the native kernels.

An sdist is built from a copy of the project files (the build writes ``build/`` and
``*.egg-info`` next to its sources), a wheel from the sdist, and the wheel is installed with ``pip --target`` into a directory that a
fresh interpreter puts first on its path. Before setup.py copied ``csrc/`` into the package, such
an install found no kernel sources and fell back to the reference backend with one warning.
Also: the torch floor, one number in pyproject.toml and dist8.version, enforced at import.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from dist8.kernels import build

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "dist8", "csrc"]

PROBE = """
import json, sys, warnings
warnings.simplefilter("error")  # a fallback to the reference backend warns: fail on it
import torch, dist8
from dist8.kernels import build, get_backend
opt = dist8.AdamW8bit([torch.nn.Parameter(torch.randn(4096))], lr=1e-3)
opt.param_groups[0]["params"][0].grad = torch.randn(4096)
opt.step()
print(json.dumps(dict(package=dist8.__file__, csrc=str(build.csrc_dir()), name=build.build_name("cpu"),
                      backend=get_backend("cpu").name)))
"""


def test_wheel_ships_the_kernel_sources_and_runs_the_native_kernels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    # the sdist first (MANIFEST.in), then the wheel from it (setup.py), as `pip install dist8-*.tar.gz` does
    sdist = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'sdist')!r}))"],
                           cwd=src, capture_output=True, text=True, timeout=600)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    (tarball,) = (tmp_path / "sdist").glob("dist8-*.tar.gz")
    built = subprocess.run([*pip, "wheel", "-q", "--no-build-isolation", "--no-deps", str(tarball), "-w", str(tmp_path / "wheel")],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("dist8-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"dist8/csrc/{p.relative_to(REPO / 'csrc')}" for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert wanted <= names, f"the wheel lacks kernel sources: {sorted(wanted - names)}"
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["package"].startswith(str(site)), seen  # the installed copy, not this checkout
    assert seen["csrc"] == str(site / "dist8" / "csrc"), seen
    assert seen["backend"] == "cpu", seen  # the native kernels, not the reference fallback
    # keyed by content: the installed sources share this checkout's build (no second compile)
    assert seen["name"] == build.build_name("cpu"), seen


def test_torch_floor_is_one_number_and_older_torch_is_refused_naming_both_versions():
    """pyproject.toml's torch dependency and ``dist8.version.MIN_TORCH`` say the same floor, and a
    torch below it gets one ImportError naming both versions from the first dist8 module that
    uses torch (a user with an old torch and ``pip install --no-deps``), not an ImportError of
    some torch.distributed name deep inside FSDP code."""
    import re

    import pytest
    from dist8.version import MIN_TORCH, check_torch_version

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"torch>=(\d+)\.(\d+)"', text).groups() == tuple(str(v) for v in MIN_TORCH)
    for version in ("2.6.0", "2.13.0+cpu", "2.10.1+cu130", "3.0.0", "2.14.0a0+git1234", "unknown"):
        check_torch_version(version)
    for version in ("2.4.1+cu121", "2.5.0", "1.13.1"):
        with pytest.raises(ImportError, match=rf"^dist8 needs torch >= 2\.6, found torch {re.escape(version)} "):
            check_torch_version(version)
    code = ("import torch; torch.__version__ = '2.4.1+cu121'\n"
            "import dist8\n"
            "try:\n    dist8.AdamW8bit\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("dist8 needs torch >= 2.6, found torch 2.4.1+cu121"), out.stdout + out.stderr
