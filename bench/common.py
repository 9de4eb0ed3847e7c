"""Shared helpers of the benchmarks: machine description, timing, JSON results."""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    """A free TCP port on loopback for a spawned process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_generation(vendor: str, family: int, model: int) -> str | None:
    """The microarchitecture of an x86 CPU from its cpuid family and model, where it is one this
    project has measured on or a neighbour of those (a VM's model name, e.g. "AMD EPYC", hides it;
    the CPU speed line differs by generation: BENCHMARKS.md sections 13-15)."""
    if vendor == "AuthenticAMD":
        if family == 23:
            return "Zen 2" if model >= 0x30 else "Zen/Zen+"
        if family == 25:
            return "Zen 4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF else "Zen 3"
        if family == 26:
            return "Zen 5"
    if vendor == "GenuineIntel" and family == 6:  # the Xeon server cores, and Rocket Lake (Xeon E-2300)
        return {0x55: "Skylake-SP/Cascade Lake", 0x6A: "Ice Lake-SP", 0x6C: "Ice Lake-SP", 0x8F: "Sapphire Rapids",
                0xCF: "Emerald Rapids", 0xAD: "Granite Rapids", 0xA7: "Rocket Lake"}.get(model)
    return None


def first_cpu_fields() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as key -> value (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpuid_line(fields: dict[str, str]) -> str | None:
    """"AuthenticAMD family 26 model 2 (Zen 5)" from :func:`first_cpu_fields`, or None without those keys."""
    try:
        vendor, family, model = fields["vendor_id"], int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        return None
    generation = cpu_generation(vendor, family, model)
    return f"{vendor} family {family} model {model}" + (f" ({generation})" if generation else "")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    fields = first_cpu_fields()
    info = {
        "host": socket.gethostname(),
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpuid": cpuid_line(fields),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    from importlib import metadata

    for name in ("bitsandbytes", "torchao", "deepspeed"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_json(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}-{machine()['host']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


class ReferenceLion(torch.optim.Optimizer):
    """Lion as lion-pytorch writes it (Chen et al. 2023: decoupled decay, sign of the interpolation): the fp32
    reference of bench/accuracy.py and tests/test_bnb_suite.py (lion-pytorch is not a dependency)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                exp_avg = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((exp_avg * beta1 + p.grad * (1 - beta1)).sign_(), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
