"""The ``dist8`` command line: ``info``, ``ckpt`` and ``train`` sub-commands."""
from __future__ import annotations

import argparse
import os
import platform
import sys

__all__ = ["main"]


def _info(_args: argparse.Namespace) -> int:
    import torch

    import dist8
    from dist8.kernels import backend_report

    print(f"dist8 {dist8.__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  ({platform.machine()}, {torch.get_num_threads()} threads)")
    from importlib import metadata

    for name in ("bitsandbytes", "torchao", "deepspeed", "safetensors"):
        try:  # read versions without importing: the anchors print a lot when imported
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} not installed")
    print("kernel backends:")
    for device, row in backend_report().items():
        print(f"  {device:5s} {row['backend']:10s} {row['why']}")
    return 0


def _register_info(sub) -> None:
    sub.add_parser("info", help=_COMMANDS["info"]).set_defaults(func=_info)


def _register_train(sub) -> None:
    from dist8.train import cli as train_cli

    train_cli.register(sub)


def _register_ckpt(sub) -> None:
    from dist8.checkpoint import cli as ckpt_cli  # imports torch (the checkpoint package needs it)

    ckpt_sub = ckpt_cli.register(sub)
    # Converters of the integrations layer join `dist8 ckpt` here (checkpoint never imports integrations).
    from dist8.integrations import deepspeed_convert

    deepspeed_convert.register_cli(ckpt_sub, ckpt_cli.guard)


# Sub-command -> one-line help. Only the sub-command being run gets its full parser (and imports
# its layer); the others are listed by name, so `dist8 --help` and `dist8 train --bogus` answer
# without importing torch.
_COMMANDS = {
    "info": "versions and the kernel backend each device uses",
    "train": "train the reference GPT with a dist8 optimizer (YAML config)",
    "ckpt": "inspect, verify and convert dist8 checkpoints",
}
_REGISTER = {"info": _register_info, "train": _register_train, "ckpt": _register_ckpt}


def _command_in(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dist8`` parser: the full parser of sub-command ``command`` (``"all"``: of every one),
    names and help only for the others."""
    parser = argparse.ArgumentParser(prog="dist8", description="Sharded 8-bit optimizers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(_COMMANDS) + "}")
    for name, help_text in _COMMANDS.items():
        if command in (name, "all"):
            _REGISTER[name](sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _follow_latest(args: argparse.Namespace) -> None:
    """``dist8 ckpt info|verify|consolidate ROOT``: a checkpoint root stands for its newest checkpoint."""
    path = getattr(args, "path", None)
    if path is None or not os.path.isdir(path) or os.path.isfile(os.path.join(path, "metadata.json")):
        return
    from dist8.checkpoint import latest

    found = latest(path)
    if found is not None:
        print(f"dist8 ckpt: {path} is a checkpoint root; using its newest checkpoint {found}", file=sys.stderr)
        args.path = str(found)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    args = build_parser(command).parse_args(argv)
    if args.command == "ckpt":
        from dist8.checkpoint import CheckpointError

        try:
            _follow_latest(args)
        except CheckpointError as exc:  # e.g. a `latest` pointer that leaves the root
            print(f"dist8 ckpt: error: {exc}", file=sys.stderr)
            return 2
    from dist8.env import EnvironmentSettingError, check_environment

    try:
        check_environment()  # before any rank starts: `dist8 train` ranks would each fail on it
        return int(args.func(args) or 0)
    except EnvironmentSettingError as exc:  # a mistyped DIST8_* variable: one line, not a traceback
        print(f"dist8 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
