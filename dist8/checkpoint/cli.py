"""``dist8 ckpt info|verify|consolidate`` sub-commands."""
from __future__ import annotations

import argparse
import math
import sys

from dist8.checkpoint.convert import consolidate, describe
from dist8.checkpoint.format import (
    METADATA,
    CheckpointError,
    read_metadata,
    verify_files,
)
from dist8.checkpoint.groups import check_saved_groups
from dist8.checkpoint.reader import read_whole

__all__ = ["register"]

_VERIFY_BATCH_ELEMENTS = 1 << 24  # parameter elements whose state verify reads at once (fp32 Adam: 128 MiB)


def _info(args: argparse.Namespace) -> int:
    summary = describe(args.path)
    meta = summary["meta"]
    print(f"{args.path}: dist8 checkpoint v{meta['version']} (dist8 {meta.get('dist8_version')}), optimizer "
          f"{meta['optimizer']['class']}, step {meta.get('step')}, saved on {meta['world_size']} rank(s), "
          f"block size {meta['block_size']}")
    print(f"{'parameter':40s} {'shape':>18s} {'elements':>12s} {'state bytes':>12s} {'bytes/elem':>10s}")
    total_n = total_b = 0
    for p in meta["params"]:
        n = math.prod(p["shape"])
        b = summary["state_bytes"].get(p["name"], 0)
        total_n, total_b = total_n + n, total_b + b
        print(f"{p['name'][:40]:40s} {tuple(p['shape'])!s:>18s} {n:12d} {b:12d} {b / max(n, 1):10.3f}")
    print(f"{'total':40s} {'':>18s} {total_n:12d} {total_b:12d} {total_b / max(total_n, 1):10.3f}")
    for fname, f in sorted(meta["files"].items()):
        print(f"  {fname}  {f['size']} bytes  sha256 {f['sha256'][:16]}...")
    return 0


def _verify(args: argparse.Namespace) -> int:
    meta = read_metadata(args.path)
    verify_files(args.path, meta)
    groups = meta["optimizer"]["param_groups"]  # ranges and finiteness (types are checked again on load)
    check_saved_groups(groups, f"{args.path}/{METADATA}")
    # Every tensor through load's reader (dtypes, shapes, values), a batch of parameters at a time so that
    # memory stays bounded: sizes and hashes alone passed a NaN absmax written with a fixed hash. (One
    # parameter per read made verify quadratic: every read opens the files and reads their headers.)
    batch: set[str] = set()
    elements = 0
    for p in meta["params"]:
        batch.add(p["name"])
        elements += math.prod(p["shape"])
        if elements >= _VERIFY_BATCH_ELEMENTS:
            read_whole(args.path, meta, verify=False, names=batch)
            batch, elements = set(), 0
    if batch:
        read_whole(args.path, meta, verify=False, names=batch)
    manifest = "manifest sha256 checked" if meta.get("version", 1) >= 2 else "format v1: no manifest hash"
    print(f"{args.path}: OK ({len(meta['files'])} files and every tensor verified, {manifest})")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    out = consolidate(args.path, args.out, force=args.force, fp32_weights_file=args.fp32_weights)
    extra = ", fp32 master weights in model-fp32.safetensors" if args.fp32_weights else ""
    print(f"wrote {out} (world size 1{extra})")
    return 0


def guard(func):
    """Turn a CheckpointError into one line on stderr and exit code 2."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CheckpointError as exc:
            print(f"dist8 ckpt: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2

    return run


def register(subparsers):
    """Add ``dist8 ckpt``; returns its sub-parsers so higher layers can add converters."""
    ckpt = subparsers.add_parser("ckpt", help="inspect, verify and convert dist8 checkpoints")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    p = sub.add_parser("info", help="table of parameters, bytes, world size and step")
    p.add_argument("path")
    p.set_defaults(func=guard(_info))
    p = sub.add_parser("verify", help="check sizes and sha256 of every file, then every tensor as load does")
    p.add_argument("path")
    p.set_defaults(func=guard(_verify))
    p = sub.add_parser("consolidate", help="rewrite as a one-file, world-size-1 checkpoint")
    p.add_argument("path")
    p.add_argument("out", help="output directory; must not exist or be empty unless --force")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT (after the new one is written)")
    p.add_argument("--fp32-weights", action="store_true",
                   help="also write OUT/model-fp32.safetensors: fp32 weights, bf16/fp16 parameters decoded with their "
                        "master_weight_bits correction")
    p.set_defaults(func=guard(_consolidate))
    return sub
