"""Fixtures shared by the test modules.

The kernel backends under test (tests/test_kernels.py, tests/test_kernels_master.py): a test
parametrized with ``kernel_cases.per_backend`` gets ``backend_id`` ("cpu", "cuda-block",
"cuda-warp", "emulated-block", "emulated-warp"); ``backend`` loads that backend, ``kind`` is
"cpu", "cuda" or "emulated" and ``device`` is where the backend's tensors live.

Order: the two pytest-xdist workers take whole files (``--dist loadfile``) from one queue, so
the longest files go first (longest-processing-time-first) and short ones fill the gaps at the
end; xdist's own order (by number of tests, ``--no-loadscope-reorder`` turns it off) started the
few-test multi-process files last and left one worker running them alone for minutes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One intra-op thread per test process (and the processes tests start), unless the caller chose:
# the two xdist workers share the 2-core machine, and torch's default of a thread per core in each
# spent ~40% more CPU spinning in OpenMP for the same wall time (tests/test_bnb_suite.py and
# test_optim_vs_torch.py: 162 s -> 99 s of CPU), CPU the multi-process tests beside them wait for.
# The kernels' independence of the thread count has its own test with 4 threads
# (test_kernels.py::test_results_do_not_depend_on_the_thread_count).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # imported before this file (a plugin): the variable came too late
        sys.modules["torch"].set_num_threads(1)

# CPU seconds per file on the 2-core CI machine (warm kernel caches; the two nvcc compiles cold), measured
# 2026-12-02 with one intra-op thread per process. Files not listed run after these, in collection order.
# Refresh with `python -m pytest --junitxml=j.xml` when a file's time changes a lot; a stale entry costs
# balance, not correctness.
FILE_SECONDS = {
    "test_train.py": 200, "test_bnb_suite.py": 90, "test_deepspeed.py": 80, "test_lightning.py": 75,
    "test_cuda_compile_cuda_torch.py": 75, "test_readme.py": 70, "test_cuda_compile.py": 70, "test_hf_trainer.py": 40, "test_clients.py": 37,
    "test_train_memory.py": 60, "test_kernels_cpu_builds.py": 50, "test_train_errors.py": 50, "test_kernels.py": 35, "test_run_codes.py": 15,
    "test_fsdp.py": 30, "test_sharded.py": 25, "test_train_faults.py": 20, "test_checkpoint.py": 20,
    "test_optim_behaviour.py": 15, "test_tensor_parallel.py": 15, "test_hsdp.py": 15, "test_checkpoint_stages.py": 10, "test_checkpoint_hostile.py": 15,
    "test_deepspeed_hint.py": 15, "test_optim_vs_torch.py": 10, "test_torch_optim_db.py": 8, "test_sharded_mixed.py": 8,
    "test_packaging.py": 7, "test_kernels_master.py": 5, "test_sharded_errors.py": 20, "test_random_configs.py": 30,
    "test_train_inputs.py": 15, "test_deepspeed_convert_inputs.py": 10, "test_checkpoint_cli_inputs.py": 5,
    "test_sharded_agreement.py": 12, "test_checkpoint_agreement.py": 18, "test_fsdp_agreement.py": 12,
    "test_override_marks.py": 8, "test_random_lifecycles.py": 10, "test_empty_state_entries.py": 8,
    "test_dcp_init.py": 10,
}


def pytest_collection_modifyitems(session, config, items) -> None:
    """Longest files first (stable: the tests of a file keep their order)."""
    items.sort(key=lambda item: -FILE_SECONDS.get(Path(str(item.fspath)).name, 0))


@pytest.fixture
def kind(backend_id: str) -> str:
    """"cpu", "cuda" or "emulated"."""
    return backend_id.split("-")[0]


@pytest.fixture
def device(kind: str) -> str:
    """Where the backend's tensors live (the emulated CUDA kernels run on CPU tensors)."""
    return "cuda" if kind == "cuda" else "cpu"


@pytest.fixture
def backend(backend_id: str, kind: str, monkeypatch):
    """The backend under test; the CUDA variants (block / warp kernel) are picked per call by DIST8_CUDA_KERNEL."""
    from dist8.kernels import native

    if kind == "cpu":
        return native.load_backend("cpu")
    monkeypatch.setenv("DIST8_CUDA_KERNEL", backend_id.split("-")[1])
    if kind == "cuda":
        return native.load_backend("cuda")
    from _cuda_emulation import emulated_cuda_backend

    return emulated_cuda_backend()
