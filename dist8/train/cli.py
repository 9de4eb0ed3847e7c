"""``dist8 train``: the command line of the reference training job.

    dist8 train --config configs/tiny-gpt.yaml [--set train.steps=100 ...] [--resume auto]
    dist8 train --nproc-per-node 2 --config configs/tiny-gpt.yaml      # 2 ranks on this machine
    torchrun --nproc_per_node=2 -m dist8.train --config configs/tiny-gpt.yaml

Expected failures (unknown key, wrong type, unknown optimizer, sharding mode not
available, missing data path, corrupt checkpoint, world-size mismatch, a loss that
became inf/NaN, ...) print one line on stderr and exit with code 2, also from the ranks
of a multi-process job.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_arguments", "main", "register", "train_command", "EXIT_CONFIG"]

EXIT_CONFIG = 2
DEFAULT_CONFIG = "configs/tiny-gpt.yaml"
# Set by `dist8 train --nproc-per-node` for its workers: the parent already printed the notes.
_LAUNCHED_ENV = "DIST8_TRAIN_LAUNCHED"
_LAUNCHER_PID_ENV = "DIST8_TRAIN_LAUNCHER_PID"  # the launcher's pid: its workers stop when it dies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help=f"YAML config (default: {DEFAULT_CONFIG} if it exists, else built-in defaults)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (value parsed as YAML); repeatable")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': resume from the newest complete checkpoint in checkpoint.dir (if any); "
                             "or a checkpoint directory, or a checkpoint root (its newest checkpoint)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after this step (checkpointing it) as if preempted; the schedule still uses train.steps")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int, default=None,
                        metavar="N", help="run N ranks on this machine (checks the config here, then launches "
                                          "them through torch.distributed.run, like torchrun --standalone)")
    parser.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=0, metavar="K",
                        help="with --nproc-per-node: restart the ranks up to K times after a failure; "
                             "add --resume auto to continue from the newest checkpoint")
    # Launchers that pass the local rank as an argument (deepspeed, torch.distributed.launch) also set
    # LOCAL_RANK, which is what the job reads.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train the reference GPT with a dist8 optimizer (YAML config)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=train_command)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _error_marker() -> Path | None:
    """A file the first failing local rank of a torchrun attempt creates, so the node prints one line.

    torchrun gives each worker ``TORCHELASTIC_ERROR_FILE`` = ``<log dir>/attempt_<n>/<local rank>/error.json``;
    the attempt directory is shared by the node's workers and unique to this launch.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return None
    return Path(error_file).parent.parent / "dist8-error-reported"


def _error(msg: str) -> int:
    line = f"dist8 train: error: {msg}\n"
    marker = _error_marker()
    if marker is not None:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return EXIT_CONFIG  # another rank of this node already said it
        except OSError:
            pass
    elif os.environ.get("LOCAL_RANK", "0") != "0":
        return EXIT_CONFIG  # other launchers: local rank 0 speaks for the node
    sys.stderr.write(line)
    sys.stderr.flush()
    return EXIT_CONFIG


def _note(msg: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0" and not os.environ.get(_LAUNCHED_ENV):
        print(f"dist8 train: note: {msg}", file=sys.stderr, flush=True)


def _expected_errors() -> tuple[type[BaseException], ...]:
    from dist8.checkpoint import CheckpointError
    from dist8.train.config import ConfigError, TrainingDiverged

    # FloatingPointError: also the optimizer's on_nonfinite="raise" ("non-finite gradient in parameter ...").
    return ConfigError, CheckpointError, TrainingDiverged, FloatingPointError


def _prepare(args: argparse.Namespace):
    """Load, fit and check the config (raises ConfigError); returns (config path, config)."""
    from dist8.train.config import ConfigError, fit_to_optimizer, load_config
    from dist8.train.engine import check_mode_available

    config_path = args.config
    if config_path is None and Path(DEFAULT_CONFIG).is_file():
        config_path = DEFAULT_CONFIG
    cfg = load_config(config_path, args.sets)
    for note in fit_to_optimizer(cfg):
        _note(note)
    for note in check_mode_available(cfg):
        _note(note)
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        most = _most_ranks()
        if args.nproc_per_node > most:  # 100000 spawned ranks until the machine ran out of memory (outside probe)
            raise ConfigError(f"--nproc-per-node {args.nproc_per_node} is more ranks than this machine runs: at most "
                              f"{most} (4 per CPU core, or one per GPU where there are more GPUs)")
    if args.stop_at is not None and args.stop_at < 0:  # -5 trained nothing and replaced the run's metrics
        raise ConfigError(f"--stop-at must be a step >= 0, got {args.stop_at}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.resume not in (None, "auto") and not os.path.isdir(args.resume):
        raise ConfigError(f"--resume: {args.resume!r} is not a checkpoint directory (use 'auto' or a path)")
    if args.resume == "auto" and not cfg.checkpoint.dir:
        raise ConfigError("--resume auto needs checkpoint.dir to be set")
    return config_path, cfg


def _most_ranks() -> int:
    """The most ranks ``--nproc-per-node`` starts here: 4 per CPU core, or one per GPU if that is more."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return max(4 * (os.cpu_count() or 1), gpus)


def train_command(args: argparse.Namespace) -> int:
    # Imported here so that `dist8 --help` and argument errors never wait for torch.
    expected = _expected_errors()
    _stop_with_the_launcher()
    try:
        config_path, cfg = _prepare(args)
        if args.nproc_per_node is not None:
            return _launch(args, config_path)
        from dist8.train.trainer import run

        name = Path(config_path).stem if config_path else "defaults"
        return run(cfg, resume=args.resume, stop_at=args.stop_at, run_name=name)
    except expected as exc:
        return _error(_one_line(exc))


def _stop_with_the_launcher() -> None:
    """A rank of ``dist8 train --nproc-per-node`` gets SIGTERM when the launcher dies (Linux: the parent-death
    signal), and so checkpoints and stops as on any SIGTERM. torchrun starts the ranks in their own session:
    a SIGKILL of the launcher left them training on, into the directories a ``--resume auto`` started then
    wrote too (found by an outside probe)."""
    launcher = os.environ.get(_LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if str(os.getppid()) != launcher:  # the launcher died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_argv(args: argparse.Namespace, config_path: str | None) -> list[str]:
    argv = ["--config", config_path] if config_path else []
    for item in args.sets:
        argv += ["--set", item]
    if args.resume is not None:
        argv += ["--resume", args.resume]
    if args.stop_at is not None:
        argv += ["--stop-at", str(args.stop_at)]
    return argv


def _launch(args: argparse.Namespace, config_path: str | None) -> int:
    """Run ``python -m dist8.train`` on N local ranks through ``torch.distributed.run`` (torchrun --standalone).

    The config was checked here already; a rank's expected failure printed its one line and
    exited 2, which becomes this command's exit code without torchrun's failure report.
    """
    import logging
    import signal

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from dist8.train.trainer import EXIT_SIGTERM

    # torchrun's own logging (rendezvous banner, "failed (exitcode: 2)" and its report) is
    # for operators of its agent; the ranks' output says what happened.
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks, without its warning
    os.environ[_LAUNCHED_ENV] = "1"
    os.environ[_LAUNCHER_PID_ENV] = str(os.getpid())  # torchrun starts the ranks from this process
    launch_args = torchrun.parse_args([
        "--standalone", f"--nproc-per-node={args.nproc_per_node}", f"--max-restarts={args.max_restarts}",
        "--module", "dist8.train", *_worker_argv(args, config_path),
    ])
    try:
        torchrun.run(launch_args)
    except SignalException:  # SIGTERM/SIGINT to this process: torchrun passed it on, the ranks checkpointed
        return EXIT_SIGTERM
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if EXIT_CONFIG in codes.values():
            return EXIT_CONFIG  # the rank printed its one line
        stopped_by_torchrun = -signal.SIGTERM  # the ranks torchrun stops once one has failed
        if EXIT_SIGTERM in codes.values() and set(codes.values()) <= {EXIT_SIGTERM, stopped_by_torchrun}:
            return EXIT_SIGTERM  # a rank got SIGTERM, checkpointed and said so
        # the first failure that is not torchrun stopping the others (rank 0's -15 hid rank 1's SIGKILL)
        rank, failure = min(exc.failures.items(),
                            key=lambda item: (item[1].exitcode == stopped_by_torchrun, item[1].timestamp, item[0]))
        code = failure.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else \
            f"exited with code {code}"
        print(f"dist8 train: error: rank {rank} {how} (its output is above)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist8.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return train_command(parser.parse_args(argv))
