"""Convergence benchmark: a small byte-level GPT on the CPython stdlib, fp32 AdamW vs 8-bit variants.

Variants (the paper's ablation in miniature, plus the anchors where installed):
  fp32            torch.optim.AdamW (fused where available)
  dist8           dist8.AdamW8bit: dynamic map, block-wise (256)
  dist8+stable    dist8.AdamW8bit with StableEmbedding (32-bit embedding state)
  linear          dist8.AdamW8bit with the linear map (ablation)
  fp8             dist8.AdamW8bit with quant_map="fp8" (e4m3 m / e5m3 v codes computed from the
                  float bits on AVX2 CPUs; sparse-fp8: the same on the sparse task)
  no-blockwise    dist8.AdamW8bit with one absmax per tensor (ablation)
  bitsandbytes    bitsandbytes.optim.AdamW8bit
  torchao         torchao.optim.AdamW8bit
  bf16-master24   dist8.AdamW8bit on bf16 parameters (dist8.cast_model: norms fp32) with
                  master_weight_bits=24 (issue 19); anchor: dist8 (fp32 parameters = fp32 master,
                  but also fp32 compute)
  bf16-master32   the same with master_weight_bits=32 (bf16 + int16: an fp32-precision master
                  with the same bf16 compute), the like-for-like anchor of bf16-master24
  bf16-pure       the same without the correction (ablation: pure bf16 parameters)
  ademamix-*      AdEMAMix (betas 0.9, 0.95, 0.999; alpha 5; t_alpha = t_beta3 = steps): dist8's 32-bit and
                  8-bit state and bitsandbytes' 8-bit; lion-*: Lion (lr / 3, betas 0.9, 0.99, weight decay x 3),
                  the same three. Their slow EMAs (AdEMAMix's m2, Lion's m) are where 8-bit round-to-nearest
                  state lags most (BENCHMARKS.md: the deadband); anchors: the 32-bit rows
  sparse-*        fp32 / dist8 / bitsandbytes (/ fp8) on the same GPT whose input is a plain nn.Embedding
                  (no StableEmbedding) of 4093 hashed byte bigrams: most rows get no gradient in
                  a step, the workload where 8-bit Adam's zeroed second moments used to make
                  lr * m / eps steps (issue 15). betas (0.9, 0.95) as every row here.

Usage: python bench/convergence.py [--quick | --full] [--seeds 0 1 2] [--variants ...] [--out FILE]
       python bench/convergence.py --merge A.json B.json --out FILE   (variants run in separate processes)
Prints a table of final validation loss (mean and spread over seeds) and writes JSON.
Goals: dist8 8-bit / fp32 final validation loss <= 1.01 (issue 2), and the same for the
sparse-embedding rows (sparse-dist8 / sparse-fp32, issue 15) and for bf16-master24 / dist8 and
bf16-master24 / bf16-master32 (issue 19).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

import dist8  # noqa: E402
from dist8.train.config import DataConfig  # noqa: E402
from dist8.train.data import load_corpus, sample_seed  # noqa: E402
from dist8.train.model import GPT, GPTConfig  # noqa: E402

PRESETS = {
    "quick": dict(n_layer=2, d_model=128, n_head=4, seq_len=128, batch=16, steps=300, lr=3e-3, eval_batches=16),
    "full": dict(n_layer=4, d_model=256, n_head=8, seq_len=256, batch=32, steps=2000, lr=1e-3, eval_batches=64),
}
BASE_VARIANTS = ["fp32", "dist8", "dist8+stable", "linear", "fp8", "no-blockwise", "bitsandbytes", "torchao"]
BF16_VARIANTS = ["bf16-master32", "bf16-master24", "bf16-pure"]
SPARSE_VARIANTS = ["sparse-fp32", "sparse-dist8", "sparse-bitsandbytes"]
FP8_VARIANTS = ["fp32", "dist8", "fp8", "sparse-fp32", "sparse-dist8", "sparse-fp8"]  # quant_map="fp8" (issue 15)
SLOW_EMA_VARIANTS = [f"{rule}-{kind}" for rule in ("ademamix", "lion") for kind in ("32bit", "8bit", "bitsandbytes")]
ALL_VARIANTS = BASE_VARIANTS + BF16_VARIANTS + SPARSE_VARIANTS + ["sparse-fp8"] + SLOW_EMA_VARIANTS
# variant prefix -> the row its ratio is taken to
ANCHORS = {"sparse-": "sparse-fp32", "bf16-": "dist8", "ademamix-": "ademamix-32bit", "lion-": "lion-32bit"}
SPARSE_VOCAB = 4093  # hashed byte bigrams (prime: the hash spreads)


def make_optimizer(variant: str, model: torch.nn.Module, lr: float, steps: int):
    variant = variant.removeprefix("sparse-")
    kw = dict(lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    named = list(model.named_parameters())
    if variant in SLOW_EMA_VARIANTS:
        return _slow_ema_optimizer(variant, named, lr, steps)
    if variant == "fp32":
        return torch.optim.AdamW([p for _, p in named], **kw)
    if variant in ("dist8", "dist8+stable", "bf16-pure"):
        return dist8.AdamW8bit(named, **kw)
    if variant in ("bf16-master24", "bf16-master32"):
        return dist8.AdamW8bit(named, master_weight_bits=int(variant[-2:]), **kw)
    if variant in ("linear", "fp8"):
        return dist8.AdamW8bit(named, quant_map=variant, **kw)
    if variant == "no-blockwise":
        return dist8.AdamW8bit(named, block_wise=False, **kw)
    if variant == "bitsandbytes":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit([p for _, p in named], **kw)
    if variant == "torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit([p for _, p in named], **kw)
    raise ValueError(f"unknown variant {variant!r}; valid: {ALL_VARIANTS}")


def _slow_ema_optimizer(variant: str, named: list, lr: float, steps: int):
    rule, kind = variant.split("-")
    if rule == "ademamix":
        kw = dict(lr=lr, betas=(0.9, 0.95, 0.999), alpha=5.0, t_alpha=steps, t_beta3=steps, weight_decay=0.1)
        names = {"32bit": "AdEMAMix32bit", "8bit": "AdEMAMix8bit", "bitsandbytes": "AdEMAMix8bit"}
    else:
        kw = dict(lr=lr / 3, betas=(0.9, 0.99), weight_decay=0.3)
        names = {"32bit": "Lion32bit", "8bit": "Lion8bit", "bitsandbytes": "Lion8bit"}
    if kind == "bitsandbytes":
        import bitsandbytes as bnb

        return getattr(bnb.optim, names[kind])([p for _, p in named], **kw)
    return getattr(dist8, names[kind])(named, **kw)


def lr_at(step: int, steps: int, lr: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def bigram_ids(x: torch.Tensor) -> torch.Tensor:
    """Input ids of the sparse task: hash of (previous byte, byte) at every position."""
    prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    return (prev * 256 + x) % SPARSE_VOCAB


def make_model(variant: str, preset: dict, seed: int) -> tuple[GPT, GPTConfig]:
    torch.manual_seed(seed)
    sparse = variant.startswith("sparse-")
    cfg = GPTConfig(n_layer=preset["n_layer"], n_head=preset["n_head"], d_model=preset["d_model"],
                    seq_len=preset["seq_len"], stable_embedding=(variant == "dist8+stable"),
                    vocab_size=SPARSE_VOCAB if sparse else 256)
    model = GPT(cfg)
    if sparse:  # bigram ids in, next byte out
        model.head = torch.nn.Linear(cfg.d_model, 256, bias=False)
        torch.nn.init.normal_(model.head.weight, mean=0.0, std=0.02)
    if variant.startswith("bf16-"):
        dist8.cast_model(model, torch.bfloat16)  # the same initial values, rounded; norm layers stay fp32
    return model, cfg


def run_one(variant: str, seed: int, preset: dict, corpus) -> dict:
    model, cfg = make_model(variant, preset, seed)
    inputs = bigram_ids if variant.startswith("sparse-") else (lambda x: x)
    opt = make_optimizer(variant, model, preset["lr"], preset["steps"])
    curve = []
    t0 = time.perf_counter()
    for step in range(preset["steps"]):
        for group in opt.param_groups:
            lr = lr_at(step, preset["steps"], preset["lr"])
            if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        x, y = corpus.batch("train", sample_seed(seed, "train", step), cfg.seq_len, preset["batch"])
        _, loss = model(inputs(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if not math.isfinite(curve[-1]):
            break
    with torch.no_grad():
        val = []
        for i in range(preset["eval_batches"]):
            x, y = corpus.batch("val", sample_seed(seed, "val", i), cfg.seq_len, preset["batch"])
            val.append(model(inputs(x), y)[1].item())
    val_loss = sum(val) / len(val)
    diverged = not math.isfinite(val_loss) or val_loss > curve[0]
    return {"variant": variant, "seed": seed, "val_loss": val_loss, "diverged": diverged,
            "seconds": time.perf_counter() - t0, "curve": curve[:: max(1, len(curve) // 100)]}


def summarize(runs: list[dict], variants: list[str], preset: dict, errors: dict) -> dict:
    """Rows (mean, spread, ratio to the row's anchor, ms/step), goal verdicts and the JSON payload of ``runs``."""
    rows = []
    for variant in variants:
        anchor = next((a for prefix, a in ANCHORS.items() if variant.startswith(prefix)), "fp32")
        fp32 = [r["val_loss"] for r in runs if r["variant"] == anchor]
        vals = [r["val_loss"] for r in runs if r["variant"] == variant and not r["diverged"]]
        all_runs = [r for r in runs if r["variant"] == variant]
        if not all_runs:
            continue
        mean = statistics.mean(vals) if vals else float("nan")
        rows.append({"variant": variant, "seeds": len(all_runs), "val_loss_mean": mean,
                     "val_loss_spread": (max(vals) - min(vals)) if len(vals) > 1 else 0.0,
                     "diverged": f"{sum(r['diverged'] for r in all_runs)}/{len(all_runs)}",
                     "ratio_to_fp32": mean / statistics.mean(fp32) if fp32 and vals else None})
    for row in rows:
        row["anchor"] = next((a for prefix, a in ANCHORS.items() if row["variant"].startswith(prefix)), "fp32")
        step_s = [r["seconds"] / preset["steps"] for r in runs if r["variant"] == row["variant"]]
        row["ms_per_step"] = 1000 * statistics.median(step_s) if step_s else None
    print_table(rows, ["variant", "seeds", "val_loss_mean", "val_loss_spread", "diverged", "ratio_to_fp32", "anchor",
                       "ms_per_step"])
    goals = []
    means = {r["variant"]: r["val_loss_mean"] for r in rows}
    for name, anchor in (("dist8", "fp32"), ("sparse-dist8", "sparse-fp32"), ("bf16-master24", "dist8"),
                         ("bf16-master24", "bf16-master32"), ("fp8", "fp32"), ("sparse-fp8", "sparse-fp32"),
                         ("ademamix-8bit", "ademamix-32bit"), ("lion-8bit", "lion-32bit")):
        if name not in means or anchor not in means:
            continue
        goal = {"goal": f"{name} / {anchor} final validation loss <= 1.01", "ratio": means[name] / means[anchor]}
        goal["met"] = goal["ratio"] is not None and goal["ratio"] <= 1.01
        print(f"goal: {goal['goal']}: ratio {goal['ratio']}, {'met' if goal['met'] else 'NOT met'}")
        goals.append(goal)
    payload = {"benchmark": "convergence", "machine": machine(), "preset": preset, "rows": rows, "runs": runs,
               "errors": errors, "goal": goals[0] if goals else None, "goals": goals}
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small preset (default)")
    parser.add_argument("--full", action="store_true", help="larger preset for a real machine")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    parser.add_argument("--sparse", action="store_true", help="only the sparse-embedding rows")
    parser.add_argument("--bf16", action="store_true", help="only the bf16 rows and their anchor (issue 19)")
    parser.add_argument("--fp8", action="store_true", help='only quant_map="fp8" and its anchors, dense and sparse')
    parser.add_argument("--slow-ema", action="store_true", help="only the AdEMAMix and Lion rows (8-bit vs 32-bit)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--out", default=None)
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="combine the runs of earlier result files (same preset) into one, running nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.sparse:
        args.variants = SPARSE_VARIANTS
    if args.bf16:
        args.variants = ["dist8", *BF16_VARIANTS]
    if args.fp8:
        args.variants = FP8_VARIANTS
    if args.slow_ema:
        args.variants = SLOW_EMA_VARIANTS
    preset = dict(PRESETS["full" if args.full else "quick"])
    if args.steps:
        preset["steps"] = args.steps
    corpus = load_corpus(DataConfig(max_bytes=4_000_000), preset["seq_len"])
    runs, errors = [], {}
    for seed in args.seeds:  # seeds outer: a partial run (killed, timed out) already compares the variants
        for variant in args.variants:
            if variant in errors:
                continue
            try:
                runs.append(run_one(variant, seed, preset, corpus))
                print(f"{variant:14s} seed {seed}: val loss {runs[-1]['val_loss']:.4f} ({runs[-1]['seconds']:.0f}s)",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - an anchor that fails is recorded, not fatal
                errors[variant] = f"{type(exc).__name__}: {exc}"
                print(f"{variant}: failed: {errors[variant]}", flush=True)
    payload = summarize(runs, args.variants, preset, errors)
    print(f"wrote {write_json('convergence', payload, args.out)}")
    return payload


def merge(files: list[str], out: str | None) -> dict:
    """One result from several partial runs (e.g. variants run in separate processes): runs concatenated,
    rows and goals recomputed; the presets must agree."""
    loaded = [json.loads(Path(f).read_text()) for f in files]
    presets = {json.dumps(d["preset"], sort_keys=True) for d in loaded}
    if len(presets) != 1:
        raise SystemExit(f"--merge: the files were run with different presets: {sorted(presets)}")
    runs = [r for d in loaded for r in d["runs"]]
    errors = {k: v for d in loaded for k, v in d.get("errors", {}).items()}
    variants = [v for v in ALL_VARIANTS if any(r["variant"] == v for r in runs)]
    payload = summarize(runs, variants, loaded[0]["preset"], errors)
    payload["machine"] = loaded[0]["machine"]
    print(f"wrote {write_json('convergence', payload, out)}")
    return payload


if __name__ == "__main__":
    main()
