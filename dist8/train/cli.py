"""``dist8 train``: the command line of the reference training job.

    dist8 train --config configs/tiny-gpt.yaml [--set train.steps=100 ...] [--resume auto]
    torchrun --nproc_per_node=2 -m dist8.train --config configs/tiny-gpt.yaml

Configuration errors (unknown key, wrong type, unknown optimizer, sharding mode
not available, ...) print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_arguments", "main", "register", "train_command", "EXIT_CONFIG"]

EXIT_CONFIG = 2
DEFAULT_CONFIG = "configs/tiny-gpt.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG} if it exists, else built-in defaults)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (value parsed as YAML); repeatable")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': resume from the newest complete checkpoint in checkpoint.dir (if any); "
                             "or a checkpoint directory")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after this step (checkpointing it) as if preempted; the schedule still uses train.steps")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train the reference GPT with a dist8 optimizer (YAML config)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=train_command)


def _error(msg: str) -> int:
    # One line, once per node (every rank of a torchrun job fails the same way).
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"dist8 train: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_CONFIG


def train_command(args: argparse.Namespace) -> int:
    from dist8.train.config import ConfigError, load_config

    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    try:
        cfg = load_config(config_path, args.sets)
        from dist8.train.engine import check_mode_available

        check_mode_available(cfg)
        from dist8.train.trainer import run

        name = Path(config_path).stem if config_path else "defaults"
        return run(cfg, resume=args.resume, stop_at=args.stop_at, run_name=name)
    except ConfigError as exc:
        return _error(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist8.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return train_command(parser.parse_args(argv))
