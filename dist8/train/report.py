"""Metrics (JSON lines), the end-of-run plot and the summary table (rank 0 only)."""
from __future__ import annotations

import json
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dist8.train.config import ConfigError

__all__ = ["MetricsWriter", "peak_memory_bytes", "plot_run", "run_summary", "summary_table", "read_metrics"]

PLOT_INSTALL_HINT = 'python -m pip install matplotlib (or the plot extra: python -m pip install -e ".[plot]")'



def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
    return out


# What a run leaves in output.dir besides metrics.jsonl: a fresh run's first record makes them stale.
CONFIG_FILE = "config.json"
STALE_AFTER_FRESH_START = ("summary.json", "training.png")


def _replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a crash mid-write leaves the old file)."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


class MetricsWriter:
    """``<out_dir>/metrics.jsonl`` (one JSON object per line) and ``config.json`` of this run.

    A fresh run (``resume_step`` None) leaves a previous run's files in ``out_dir`` untouched until
    its first record (or :meth:`begin`): a run that fails before it (a bad input found late, a crash
    at step 1) loses nothing, as a checkpoint is replaced only by a complete new one. Then
    ``config.json`` and ``metrics.jsonl`` are replaced and the previous run's summary and plot, which
    would describe metrics that are gone, removed; ``on_replace`` is called with the names of the
    previous run's files it replaced (none: not called). A resumed run keeps the records up to the
    resumed step (rewritten whole) and appends.
    """

    def __init__(self, out_dir: str | os.PathLike, config: dict[str, Any], resume_step: int | None,
                 on_replace: Callable[[list[str]], None] | None = None) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        self._config_text = json.dumps(config, indent=2)
        self._on_replace = on_replace
        self._f: Any = None
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            _replace_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            _replace_text(self.dir / CONFIG_FILE, self._config_text)
            self._f = open(self.path, "a", encoding="utf-8")

    def begin(self) -> None:
        """Replace the previous run's files now (no-op once started)."""
        if self._f is not None:
            return
        replaced = [n for n in (CONFIG_FILE, self.path.name, *STALE_AFTER_FRESH_START) if (self.dir / n).exists()]
        for name in STALE_AFTER_FRESH_START:
            (self.dir / name).unlink(missing_ok=True)
        _replace_text(self.dir / CONFIG_FILE, self._config_text)
        self._f = open(self.path, "w", encoding="utf-8")
        if replaced and self._on_replace is not None:
            self._on_replace(replaced)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.begin()
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as exc:  # a full disk or a file-size limit: 78 lines of tracebacks before
            raise ConfigError(f"config key output.dir: writing {self.path} failed: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()


def run_summary(path: str | os.PathLike, records: list[dict[str, Any]], attempt: dict[str, Any], *,
                resumed: bool, **fields: Any) -> dict[str, Any]:
    """The summary of the whole run, from ``metrics.jsonl`` and every attempt that trained it.

    ``attempt`` is this process's share (``start_step``, ``end_step``, ``world_size``, ``wall_s``,
    ``train_s``, ``tokens``, ``peak_mem_bytes``). A resumed run appends it to the attempts of the
    summary already at ``path`` (those before the resumed step); an attempt that trained no step
    (resuming a finished run) adds nothing. Losses come from the records, so a no-op resume
    reports the run's final loss, and peak memory is the maximum over all attempts.
    """
    attempts: list[dict[str, Any]] = []
    p = Path(path)
    if resumed and p.is_file():
        try:
            attempts = list(json.loads(p.read_text()).get("attempts", []))
        except (ValueError, AttributeError):  # an unreadable old summary: start the record again
            attempts = []
        start = attempt["start_step"]
        attempts = [dict(a, end_step=min(a["end_step"], start)) for a in attempts if a.get("start_step", 0) < start]
    if attempt["end_step"] > attempt["start_step"] or not attempts:
        attempts.append(attempt)
    losses = [r for r in records if r.get("loss") is not None]
    evals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    train_s = sum(a.get("train_s") or 0.0 for a in attempts)
    peaks = [a.get("peak_mem_bytes") or 0 for a in attempts] + [r.get("peak_mem_bytes") or 0 for r in records]
    summary = dict(fields)
    summary.update(
        world_size=attempts[-1]["world_size"],
        step=losses[-1]["step"] if losses else attempt["end_step"],
        final_loss=losses[-1]["loss"] if losses else None,
        final_val_loss=evals[-1] if evals else None,
        tokens_per_s=sum(a.get("tokens") or 0 for a in attempts) / train_s if train_s else 0.0,
        peak_mem_bytes=max(peaks),
        nonfinite_steps=sum(r.get("nonfinite_steps") or 0 for r in records),
        wall_s=sum(a.get("wall_s") or 0.0 for a in attempts),
        attempts=attempts,
    )
    if records and records[-1].get("opt_state_bytes_per_rank") is not None:
        summary["opt_state_bytes_per_rank"] = records[-1]["opt_state_bytes_per_rank"]
    if records and records[-1].get("memory_bytes_per_rank") is not None:
        summary["memory_bytes_per_rank"] = records[-1]["memory_bytes_per_rank"]
    return summary


def plot_run(records: list[dict[str, Any]], summary: dict[str, Any], path: str | os.PathLike) -> str | None:
    """Loss curves and a memory bar chart as one PNG; returns None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed; {PLOT_INSTALL_HINT}"
    fig, (ax_loss, ax_mem) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats/byte)")
    ax_loss.set_title(f"{summary.get('optimizer')} / {summary.get('mode')} x{summary.get('world_size')}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    _plot_memory(ax_mem, summary)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


_MEMORY_COLORS = {"params": "tab:blue", "grads": "tab:orange", "correction": "tab:purple", "master": "tab:brown",
                  "optimizer_state": "tab:green"}


def _plot_memory(ax: Any, summary: dict[str, Any]) -> None:
    """Stacked bars, bytes per parameter: this run's rank 0 (tensor accounting) next to fp32 AdamW."""
    n = max(1, summary.get("params", 0))
    mem = summary.get("memory_bytes_per_rank") or {}
    this = {k: mem.get(k, 0) / n for k in _MEMORY_COLORS}
    if not mem:  # an old run without the breakdown: its optimizer state only
        this["optimizer_state"] = summary.get("opt_state_bytes_per_rank", 0) / n
    fp32 = {"params": 4.0, "grads": 4.0, "correction": 0.0, "master": 0.0, "optimizer_state": 8.0}
    for i, column in enumerate((this, fp32)):
        bottom = 0.0
        for key, color in _MEMORY_COLORS.items():
            if column[key]:
                ax.bar(i, column[key], bottom=bottom, color=color, label=key.replace("_", " "))
                bottom += column[key]
        ax.text(i, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([0, 1], ["this run\n(rank 0)", "fp32 AdamW\n(unsharded)"], fontsize=7)
    ax.set_ylabel("bytes per parameter")
    ax.set_title(f"memory (peak RSS {summary.get('peak_mem_bytes', 0) / 2**20:.0f} MiB)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ("run", summary.get("run")),
        ("mode", f"{summary.get('mode')} ({summary.get('engine')})"),
        ("optimizer", summary.get("optimizer")),
        ("world size", summary.get("world_size")),
        ("parameters", f"{summary.get('params', 0):,}"),
        ("steps", f"{summary.get('step')} / {summary.get('steps')}"
                  + (f" ({len(summary['attempts'])} attempts)" if len(summary.get("attempts", [])) > 1 else "")),
        ("final train loss", _f(summary.get("final_loss"))),
        ("final val loss", _f(summary.get("final_val_loss"))),
        ("inf/NaN grad steps", summary.get("nonfinite_steps", 0)),
        ("tokens/s (global)", f"{summary.get('tokens_per_s', 0):,.0f}"),
        ("opt state / rank", _fmt_bytes(summary.get("opt_state_bytes_per_rank", 0))),
        ("peak memory (rank 0)", _fmt_bytes(summary.get("peak_mem_bytes", 0))),
        ("wall time", f"{summary.get('wall_s', 0):.1f} s" + (" (all attempts)" if len(summary.get("attempts", [])) > 1 else "")),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 30)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"
