"""How far 8-bit optimizers land from their fp32 reference, side by side: dist8, bitsandbytes, torchao.

torchao checks its 8-bit AdamW against bitsandbytes' on an MLP (Linear(32, 1024), ReLU,
Linear(1024, 128), batch 4, sum loss) after 2 steps. This runs that protocol for longer and on
more seeds: every 8-bit optimizer and the fp32 reference start from the same weights, see the
same batches, and after ``steps`` steps the parameters' distance to the reference's is recorded
(mean and max absolute difference over all parameters, median over seeds). Rows: dist8's
8-bit optimizers (default map, and ``quant_map="fp8"``) next to bitsandbytes' (same names, same
hyperparameters) and, for AdamW, torchao's. The MLP's ReLU leaves many exactly-zero gradient
entries, the case where 8-bit second moments matter most. CPU; ``tests/test_bnb_suite.py`` asserts
dist8 <= bitsandbytes on 3 seeds.

Usage: python bench/accuracy.py [--seeds 5] [--steps 2,10,50] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ReferenceLion, machine, print_table, write_json  # noqa: E402

import dist8  # noqa: E402


def cases() -> dict[str, tuple]:
    """name -> (fp32 reference, {library: 8-bit optimizer factory}, kwargs: a case's own lr overrides --lr)."""
    import bitsandbytes as bnb

    out = {
        "AdamW8bit": (torch.optim.AdamW, {"dist8": dist8.AdamW8bit, "bitsandbytes": bnb.optim.AdamW8bit}, {}),
        "Adam8bit": (torch.optim.Adam, {"dist8": dist8.Adam8bit, "bitsandbytes": bnb.optim.Adam8bit}, {}),
        # lr 1e-4: at 1e-3 momentum SGD diverges on this sum loss within 50 steps, for every library
        "SGD8bit": (torch.optim.SGD, {"dist8": dist8.SGD8bit, "bitsandbytes": bnb.optim.SGD8bit},
                    {"momentum": 0.9, "lr": 1e-4}),
        "RMSprop8bit": (torch.optim.RMSprop, {"dist8": dist8.RMSprop8bit, "bitsandbytes": bnb.optim.RMSprop8bit}, {}),
        "Adagrad8bit": (torch.optim.Adagrad, {"dist8": dist8.Adagrad8bit, "bitsandbytes": bnb.optim.Adagrad8bit}, {}),
        "Lion8bit": (ReferenceLion, {"dist8": dist8.Lion8bit, "bitsandbytes": bnb.optim.Lion8bit}, {}),
    }
    for _name, (_reference, libraries, _extra) in out.items():  # the opt-in small-float codes, side by side
        libraries["dist8 fp8"] = functools.partial(libraries["dist8"], quant_map="fp8")
    try:
        import torchao.optim

        out["AdamW8bit"][1]["torchao"] = torchao.optim.AdamW8bit
    except ImportError:
        pass
    return out


def run(name: str, case: tuple, seeds: int, steps: int, lr: float) -> list[dict]:
    """Rows of one case of :func:`cases` after ``steps`` steps, ``seeds`` seeds each."""
    reference, libraries, extra = case
    kwargs = dict({"lr": lr}, **extra)  # a case's own lr wins
    errors: dict[str, list[tuple[float, float]]] = {lib: [] for lib in libraries}
    for seed in range(seeds):
        torch.manual_seed(seed)
        base = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 128))
        models = {lib: copy.deepcopy(base) for lib in ["fp32", *libraries]}
        opts = {"fp32": reference(models["fp32"].parameters(), **kwargs)}
        opts.update({lib: make(models[lib].parameters(), **kwargs) for lib, make in libraries.items()})
        gen = torch.Generator().manual_seed(1000 + seed)
        for _ in range(steps):
            x = torch.randn(4, 32, generator=gen)
            for lib, model in models.items():
                model(x).sum().backward()
                opts[lib].step()
                opts[lib].zero_grad()
        ref = torch.cat([p.detach().flatten() for p in models["fp32"].parameters()])
        for lib in libraries:
            diff = (torch.cat([p.detach().flatten() for p in models[lib].parameters()]) - ref).abs()
            errors[lib].append((float(diff.mean()), float(diff.max())))
    rows = []
    for lib, errs in errors.items():
        rows.append({"optimizer": name, "library": lib, "steps": steps, "lr": kwargs["lr"], "seeds": seeds,
                     "mean_abs_err": statistics.median(e[0] for e in errs),
                     "max_abs_err": statistics.median(e[1] for e in errs),
                     "per_seed": errs})
    theirs = next((r for r in rows if r["library"] == "bitsandbytes"), None)
    for r in rows:
        if theirs is not None:
            r["mean_vs_bitsandbytes"] = r["mean_abs_err"] / theirs["mean_abs_err"] if theirs["mean_abs_err"] else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5, help="seeds per case (default 5)")
    ap.add_argument("--steps", default="2,10,50", help="comma-separated step counts (default 2,10,50)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every optimizer (default 1e-3)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/accuracy-<host>.json)")
    args = ap.parse_args()
    rows = []
    for name, case in cases().items():
        for steps in [int(s) for s in args.steps.split(",")]:
            rows += run(name, case, args.seeds, steps, args.lr)
    print_table(rows, ["optimizer", "library", "steps", "mean_abs_err", "max_abs_err", "mean_vs_bitsandbytes"])
    path = write_json("accuracy", {"machine": machine(), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
