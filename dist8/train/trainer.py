"""The training loop of ``dist8 train`` (one concern: one run, from its config to its summary, on every rank).

One code path for every world size and sharding mode (see :mod:`dist8.train.engine`).
A run is a pure function of its config: the model is initialised from
``train.seed``, every batch is drawn from ``(seed, step, rank, micro-step)`` and
the learning rate is a function of the step, so a resumed run reproduces the
uninterrupted loss curve exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist8.shard.agreement import failures_on_every_rank
from dist8.train.checkpointing import Checkpointer
from dist8.nn.cast import cast_model
from dist8.train.config import (Config, ConfigError, TrainingDiverged, check_override_patterns, config_to_dict,
                               fit_to_optimizer, torch_dtype)
from dist8.train.data import load_corpus, sample_seed
from dist8.train.engine import Engine, build_engine, install_gradient_release, optimizer_state_nbytes
from dist8.train.faults import maybe_kill, maybe_nan_gradients
from dist8.train.guards import NonfiniteSteps, check_fits, check_resumed_hyperparameters
from dist8.train.lock import directory_lock
from dist8.train.memory import memory_breakdown
from dist8.train.model import GPT, GPTConfig
from dist8.train.report import (MetricsWriter, peak_memory_bytes, plot_run, read_metrics, run_summary,
                                summary_table)
from dist8.train.resume import resume_path
from dist8.version import major_minor

__all__ = ["lr_at", "run", "EXIT_SIGTERM"]

EXIT_SIGTERM = 128 + signal.SIGTERM


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then the schedule to ``min_lr``."""
    t = cfg.train
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    if t.schedule == "linear":
        return t.lr + (t.min_lr - t.lr) * progress
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- process group ---------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int, int, torch.device]:
    """Join the torchrun job (or make a world of one); pick CUDA + NCCL when a GPU is present."""
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend, timeout = ("nccl" if use_cuda else "gloo"), timedelta(minutes=10)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's static rendezvous (--master_port) keeps one agent TCPStore across
            # restarts, so keys of the killed attempt (e.g. gloo peer addresses) would be
            # read by the next one ("Connection refused"). Namespace them by attempt.
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"dist8/attempt-{attempt}", store), rank=rank,
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    else:
        local_rank = 0
        os.environ["LOCAL_RANK"] = "0"  # what a launcher sets (DeepSpeed asserts it), for this world of one
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local_rank, device


class _StopFlag:
    """SIGTERM or a first SIGINT (Ctrl-C; torchrun passes its own SIGINT on to the ranks) sets the flag; the loop
    agrees on it across ranks at the next step boundary and saves a checkpoint. A second SIGINT interrupts at
    once. Until 2026-12-05 SIGINT stopped the ranks mid-step with ~90 lines of tracebacks and no checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.name = "SIGTERM"  # the signal that set the flag (a rank told by another rank's flag says SIGTERM)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[dist8 train] {msg}", flush=True)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _evaluate(cfg: Config, engine: Engine, corpus, device: torch.device, rank: int, world: int) -> float:
    model = engine.model
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(cfg.train.eval_batches):
        x, y = corpus.batch("val", sample_seed(cfg.train.seed, "val", i, rank), cfg.model.seq_len, cfg.train.batch_size)
        with _autocast(cfg, device):
            _, loss = model(x.to(device), y.to(device))
        total += loss.double()
    model.train()
    dist.all_reduce(total)
    return float(total) / (cfg.train.eval_batches * world)


def run(cfg: Config, *, resume: str | None = None, stop_at: int | None = None, run_name: str = "run") -> int:
    """Train according to ``cfg``. Returns the process exit code (0, or 143 after SIGTERM).

    ``resume``: ``"auto"`` (the newest complete checkpoint under ``checkpoint.dir``, if any), a
    checkpoint directory, or a checkpoint root (its newest checkpoint). Expected failures raise
    :class:`ConfigError` or :class:`dist8.checkpoint.CheckpointError` with a one-line message.
    """
    for note in fit_to_optimizer(cfg):  # a no-op when the CLI did it already
        print(f"[dist8 train] note: {note}", file=sys.stderr, flush=True)
    if resume is not None and resume != "auto" and not os.path.isdir(resume):
        raise ConfigError(f"--resume: {resume!r} is not a checkpoint directory (use 'auto' or a path)")
    if resume == "auto" and not cfg.checkpoint.dir:
        raise ConfigError("--resume auto needs checkpoint.dir to be set")
    rank, world, _local_rank, device = _init_distributed()
    finished = False
    try:
        with contextlib.ExitStack() as held:  # rank 0's directory locks, released however the run ends
            code = _train(cfg, resume, stop_at, run_name, rank, world, device, held)
        finished = True
        return code
    finally:
        if dist.is_initialized():
            leave_process_group(finished)


# torch before 2.8 destroys a gloo process group holding the GIL while it joins its worker threads,
# and a worker that is still releasing a finished collective's tensors waits for the GIL: the rank
# hangs at exit after its work is done (pytorch/pytorch#154976, in 2.8). Measured with 2 ranks on
# torch 2.6 after three all_gather_object calls: 11 of 25 launches hung; with a barrier and 0.2 s
# with the GIL released before destroying, 0 of 40.
GLOO_EXIT_NEEDS_DRAIN = (major_minor(torch.__version__) or (0, 0)) < (2, 8)
GLOO_DRAIN_SECONDS = 0.2


def leave_process_group(finished: bool) -> None:
    """``dist.destroy_process_group()``; after a run every rank finished, on gloo before torch 2.8,
    first a barrier and a short sleep that let gloo's workers release their last collectives."""
    if finished and GLOO_EXIT_NEEDS_DRAIN and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        dist.barrier()
        time.sleep(GLOO_DRAIN_SECONDS)  # releases the GIL: the workers finish what they hold
    dist.destroy_process_group()


def _load_checkpoint(ckpt: Checkpointer, path: str) -> dict[str, Any]:
    """``ckpt.load(path)`` with every failure of reading it as one CheckpointError line naming ``path``."""
    from dist8.checkpoint import CheckpointError

    try:
        return ckpt.load(path)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # A missing/corrupt file, bad JSON, a shape or world-size mismatch of the torch.save
        # writer: the user's checkpoint, not a bug here.
        raise CheckpointError(f"cannot resume from {path}: {' '.join(str(exc).split())}") from None


def _make_output_dir(out_dir: Path) -> None:
    """``output.dir`` created (rank 0), or a ConfigError naming it."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"config key output.dir: cannot create {str(out_dir)!r}: {exc.strerror or exc}") from None


def _train(cfg: Config, resume, stop_at, run_name, rank, world, device, held: contextlib.ExitStack) -> int:
    t0 = time.time()
    t = cfg.train
    gpt = GPTConfig(n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, d_model=cfg.model.d_model,
                    seq_len=cfg.model.seq_len, stable_embedding=cfg.model.stable_embedding)
    # every rank, before the first collective (build_engine): a rank that alone could not read the data
    # (another node's disk), fit the model (another GPU) or create output.dir (rank 0) left the others
    # waiting there forever
    out_dir = Path(cfg.output.dir)
    with failures_on_every_rank(None, "reading the data, sizing the model and creating output.dir", ConfigError):
        check_fits(cfg, gpt, device, world)
        corpus = load_corpus(cfg.data, cfg.model.seq_len)
        if rank == 0:
            _make_output_dir(out_dir)
            held.enter_context(directory_lock(out_dir, "output.dir"))  # one job per directory
            if cfg.checkpoint.dir:
                held.enter_context(directory_lock(cfg.checkpoint.dir, "checkpoint.dir"))
    torch.manual_seed(t.seed)
    model = GPT(gpt).to(device)
    # the same model on every rank: every rank refuses alike, before the first collective (build_engine)
    check_override_patterns(cfg.optimizer.args, [name for name, _ in model.named_parameters()])
    if cfg.model.dtype != "fp32":
        cast_model(model, torch_dtype(cfg.model.dtype))  # norm layers stay (and compute in) fp32
    n_params = model.num_params()
    engine = build_engine(cfg, model, device)
    _say(rank, f"{run_name}: {n_params:,} parameters, {engine.description}, optimizer {cfg.optimizer.name}, "
               f"device {device}, {corpus.describe()}")

    start = 0
    ckpt_root = cfg.checkpoint.dir

    def make_checkpointer(root: str) -> Checkpointer:
        return Checkpointer(root, cfg.sharding.mode, engine.raw_model, engine.optimizer, cfg.checkpoint.keep)

    ckpt = make_checkpointer(ckpt_root) if ckpt_root else None
    path, ckpt = resume_path(ckpt, resume, make_checkpointer)
    if path is not None:
        extra = _load_checkpoint(ckpt, path)
        check_resumed_hyperparameters(cfg, engine.optimizer, path)
        start = int(extra.get("step", 0))
        _say(rank, f"resumed from {path} at step {start} ({ckpt.describe()})")
        saved_world = extra.get("world_size")
        if isinstance(saved_world, int) and saved_world != world:  # the batches differ from here on, silently
            _say(rank, f"note: the checkpoint was saved by {saved_world} rank(s), this run has {world}: each step "
                       f"now takes {world * t.batch_size * t.grad_accum} sequences (train.batch_size x "
                       f"train.grad_accum x ranks) where it took {saved_world * t.batch_size * t.grad_accum}, so "
                       "the losses differ from a run that kept its world size")
    elif resume == "auto":
        _say(rank, f"no checkpoint under {ckpt_root}; starting at step 0")
    if t.gradient_release:
        install_gradient_release(engine, t.weight_grad_chunk)

    metrics = None
    if rank == 0:  # a fresh run replaces a previous run's files at its first record, not here
        metrics = MetricsWriter(out_dir, config_to_dict(cfg), resume_step=start if path is not None else None,
                                on_replace=lambda names: _say(rank, f"replacing the previous run's {', '.join(names)} "
                                                                    f"in {out_dir}"))

    nonfinite = NonfiniteSteps(t.max_nonfinite_steps, engine.nonfinite_skips)
    stop = _StopFlag()
    stop.install()
    tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum * world
    last = {"loss": None, "val_loss": None, "step": start}
    window_time, window_steps, total_time, total_steps = 0.0, 0, 0.0, 0
    end = t.steps if stop_at is None else min(t.steps, stop_at)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
                   file=sys.stderr)
    exit_code = 0
    step = start
    try:
        for step in range(start + 1, end + 1):
            maybe_kill(cfg, step, rank)
            tic = time.perf_counter()
            lr = lr_at(cfg, step)
            engine.set_lr(lr)
            nonfinite.begin_step()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro in range(t.grad_accum):
                x, y = corpus.batch("train", sample_seed(t.seed, "train", step, rank, micro), cfg.model.seq_len,
                                    t.batch_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if engine.owns_accumulation:
                    with _autocast(cfg, device):
                        _, loss = engine.model(x, y)
                    engine.backward(maybe_nan_gradients(cfg, step, rank, loss))
                    engine.step()
                else:
                    sync = micro == t.grad_accum - 1
                    with (contextlib.nullcontext() if sync else engine.no_sync()):
                        with _autocast(cfg, device):
                            _, loss = engine.model(x, y)
                        engine.backward(maybe_nan_gradients(cfg, step, rank, loss) / t.grad_accum)
                loss_sum += loss.detach().double()
            skipped_step = False
            if engine.owns_accumulation:
                grad_norm = engine.clip_grad_norm(t.clip)
            elif engine.release is not None:  # stepped inside backward; no gradient is left to measure
                grad_norm = None
            else:
                grad_norm = engine.clip_grad_norm(t.clip)
                # The norm is global (every rank skips alike); a non-finite one has made every gradient
                # inf/NaN or 0 through the clip coefficient, so the step would train nothing right.
                skipped_step = not math.isfinite(grad_norm)
                if not skipped_step:
                    engine.step()
                engine.zero_grad()
            # One small all-reduce per step: the global mean loss, "anyone got SIGTERM", "anyone saw inf/NaN".
            flags = torch.tensor([float(stop.requested), nonfinite.flag(grad_norm)], dtype=torch.float64, device=device)
            shared = torch.cat([(loss_sum / t.grad_accum).reshape(1), flags])
            dist.all_reduce(shared)
            step_loss = float(shared[0]) / world
            stop_now = bool(shared[1] > 0)
            saw_nonfinite = bool(shared[2] > 0)
            dt = time.perf_counter() - tic
            window_time += dt
            window_steps += 1
            total_time += dt
            total_steps += 1
            if not math.isfinite(step_loss):
                raise TrainingDiverged(f"loss is {step_loss} at step {step}; stopping (lower train.lr?)")
            nonfinite.update(saw_nonfinite, step, lambda msg: _say(rank, msg), skipped_step)

            evaluated = bool(t.eval_every and step % t.eval_every == 0) or step == t.steps
            val_loss = _evaluate(cfg, engine, corpus, device, rank, world) if evaluated else None
            if val_loss is not None:
                last["val_loss"] = val_loss
            last.update(loss=step_loss, step=step)
            if step % t.log_every == 0 or evaluated or step == end or saw_nonfinite:
                tps = tokens_per_step * window_steps / max(window_time, 1e-9)
                record = {
                    "step": step,
                    "loss": step_loss,
                    "val_loss": val_loss,
                    "lr": lr,
                    "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                    "nonfinite_steps": nonfinite.take_window(),
                    "tokens_per_s": tps,
                    "opt_state_bytes_per_rank": optimizer_state_nbytes(engine.optimizer),
                    "peak_mem_bytes": peak_memory_bytes(device),
                    "memory_bytes_per_rank": memory_breakdown(engine.raw_model, engine.optimizer,
                                                              gradient_release=engine.release or False),
                }
                window_time, window_steps = 0.0, 0
                if metrics is not None:
                    metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_step / max(dt, 1e-9):,.0f}",
                                refresh=False)
            every = cfg.checkpoint.every
            final = step == end or stop_now
            if ckpt_root and ((every and step % every == 0) or final):
                ckpt.save(step, extra={"step": step, "run": run_name, "world_size": world})
            if stop_now:
                _say(rank, f"{stop.name}: stopped at step {step}"
                     + (f", checkpoint saved in {ckpt_root}" if ckpt_root else ""))
                exit_code = EXIT_SIGTERM
                break
        if metrics is not None:
            metrics.begin()  # a run that logged nothing (--stop-at 0) still replaces what its summary describes
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()

    if rank == 0 and exit_code in (0, EXIT_SIGTERM):  # a stopped run's record is kept up to date too
        if start >= end:
            _say(rank, f"nothing to train: resumed at step {start}, the run ends at step {end}")
        records = read_metrics(out_dir / "metrics.jsonl")
        this_attempt = {
            "start_step": start,
            "end_step": last["step"],
            "world_size": world,
            "wall_s": time.time() - t0,
            "train_s": total_time,
            "tokens": tokens_per_step * total_steps,
            "peak_mem_bytes": peak_memory_bytes(device),
        }
        summary = run_summary(out_dir / "summary.json", records, this_attempt, resumed=path is not None,
                              run=run_name, mode=cfg.sharding.mode, engine=engine.description,
                              optimizer=cfg.optimizer.name, params=n_params, steps=t.steps,
                              opt_state_bytes_per_rank=optimizer_state_nbytes(engine.optimizer),
                              checkpoint_backend=ckpt.describe() if ckpt is not None else None)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if not cfg.output.plot:
            summary_note = "plot off (output.plot: false)"
        else:
            plotted = plot_run(records, summary, out_dir / "training.png")
            summary_note = f"plot: {out_dir / 'training.png'}" if plotted is None else f"plot skipped: {plotted}"
        print(summary_table(summary), flush=True)
        _say(rank, f"metrics: {out_dir / 'metrics.jsonl'}; {summary_note}")
    return exit_code
