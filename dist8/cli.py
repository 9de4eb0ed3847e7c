"""The ``dist8`` command line: ``info``, ``ckpt`` and ``train`` sub-commands."""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist8", description="Sharded 8-bit optimizers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and the kernel backend each device uses").set_defaults(func=_info)
    for register in _subcommand_registrars():
        register(sub)
    from dist8.checkpoint import cli as ckpt_cli

    ckpt_sub = ckpt_cli.register(sub)
    # Converters of the integrations layer join `dist8 ckpt` here (checkpoint never imports integrations).
    from dist8.integrations import deepspeed_convert

    deepspeed_convert.register_cli(ckpt_sub, ckpt_cli.guard)
    return parser


def _subcommand_registrars():
    """Sub-commands that live with their layer (checkpoint, train), registered if importable."""
    registrars = []
    for module_name in ("dist8.train.cli",):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ImportError as exc:
            if exc.name != module_name:
                raise
            continue
        registrars.append(module.register)
    return registrars


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
