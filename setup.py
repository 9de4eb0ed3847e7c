"""Build hook (the project's metadata is in pyproject.toml): ships the kernel sources.

dist8 JIT-builds its kernels from ``csrc/`` on first use. A source checkout and an editable
install read ``<repo>/csrc``; a wheel or a regular ``pip install .`` has no repository next to
the package, so the build copies ``csrc/`` into the package as ``dist8/csrc``, where
``dist8.kernels.build.csrc_dir()`` finds it (without it such an install fell back to the slow
reference backend).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithKernelSources(build_py):
    """``build_py`` plus ``csrc/`` -> ``<build_lib>/dist8/csrc`` (not for editable installs, which read the checkout)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "dist8" / "csrc"
        shutil.copytree(ROOT / "csrc", target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithKernelSources})
