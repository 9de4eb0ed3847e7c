"""One rank of a DeepSpeed test run (spawned by tests/test_deepspeed.py with RANK/WORLD_SIZE env vars).

``python tests/_ds_worker.py SPEC.json OUT_DIR``; SPEC holds a list of "jobs", each
{"name", "config" (DeepSpeed dict), "steps", "save": dir|None, "resume": dist8 ckpt dir|None,
"first_step": int, and the optional keys read in run_job: "bad_lr" {step: value} writes that lr into the
optimizer's groups before the step, whose ValueError ends the job and is reported as "refused"; "late_override"
{"step", "param", "config"} calls GlobalOptimManager.override_config on that model parameter before that step
(a ValueError is reported as "refused") and reports whether the parameter moved from then on}. Writes
OUT_DIR/<job>-rank<r>.json with global losses and state facts.
"""
import json
import os
import sys
import time

import torch

GLOBAL_BATCH = 8
SEQ = 16
VOCAB = 64


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.ln2 = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.out = torch.nn.Linear(4 * d, d)
        self.heads = 4

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    def __init__(self, d=64, layers=2, temperature=False):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, d)
        self.pos = torch.nn.Parameter(torch.zeros(SEQ, d))
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, VOCAB)
        # a one-value parameter (CLIP's logit_scale), given its own param group by param_groups()
        self.temperature = torch.nn.Parameter(torch.ones(1)) if temperature else None

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos[: idx.shape[1]].to(self.tok.weight.dtype)
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x)).float()
        if self.temperature is not None:
            logits = logits * self.temperature
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def SCHEDULE(step):  # noqa: N802 -- the LR factor of step ``step`` in the scheduled jobs and their reference
    return 1.0 / (1.0 + 0.25 * step)


def make_model(seed=0, temperature=False):
    torch.manual_seed(seed)
    return TinyGPT(temperature=temperature)


def param_groups(model):
    """Named param groups: the temperature (when the model has one) alone in a second group, without weight
    decay -- under ZeRO-1/2 on 2 ranks one rank's partition of that group holds only padding."""
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if n != "temperature"]},
            {"params": [(n, p) for n, p in named if n == "temperature"], "weight_decay": 0.0}]


def batch(step):
    """The global batch of ``step`` (the same on every world size): a learnable pattern plus noise."""
    g = torch.Generator().manual_seed(100 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    seq = (start + torch.arange(SEQ + 1) * 3) % VOCAB
    noise = torch.randint(0, VOCAB, seq.shape, generator=g)
    seq = torch.where(torch.rand(seq.shape, generator=g) < 0.1, noise, seq)
    return seq[:, :-1], seq[:, 1:]


def local_batch(step, rank, world):
    x, y = batch(step)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def run_job(job, rank, world, out_dir):
    import deepspeed
    import torch.distributed as dist

    import dist8.integrations.deepspeed as d8ds

    cfg = dict(job["config"])
    gas = cfg.get("gradient_accumulation_steps", 1)
    cfg.setdefault("train_batch_size", GLOBAL_BATCH)
    cfg.setdefault("train_micro_batch_size_per_gpu", GLOBAL_BATCH // world // gas)
    model = make_model(temperature=job.get("temperature", False))
    via = job.get("via", "initialize")
    client = None
    if via == "client":
        import dist8

        cfg.pop("optimizer")
        kw = {k: (tuple(v) if k == "betas" else v) for k, v in job["client"].items()}
        client = dist8.AdamW8bit(model.named_parameters(), **kw)
        engine, _opt, _, _ = d8ds.initialize(model=model, optimizer=client, config=cfg)
    elif via in ("plain_client", "both"):  # an instance through plain deepspeed.initialize, as HF Trainer,
        # accelerate and Lightning pass theirs: two param groups, an LR scheduler made on it first
        import dist8

        d8ds.install()
        if via == "plain_client":
            cfg.pop("optimizer")
        kw = {k: (tuple(v) if k == "betas" else v) for k, v in job["client"].items()}
        client = dist8.AdamW8bit(param_groups(model) if job.get("temperature") else model.named_parameters(), **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(client, SCHEDULE) if job.get("schedule") else None
        try:
            engine, _opt, _, _ = deepspeed.initialize(model=model, optimizer=client, lr_scheduler=sched, config=cfg)
        except ValueError as exc:  # "both": the config's dist8 section and an instance
            with open(os.path.join(out_dir, f"{job['name']}-rank{rank}.json"), "w") as f:
                json.dump({"refused": str(exc), "untouched": not client.state and type(client) is dist8.AdamW8bit}, f)
            return
    elif via == "torch":  # a torch.optim client optimizer, as the anchor for dist8's run of the same config
        cfg.pop("optimizer")
        cfg["zero_allow_untested_optimizer"] = True
        anchor = getattr(torch.optim, job["torch"]["cls"])(model.parameters(), **job["torch"]["kwargs"])
        engine, _opt, _, _ = deepspeed.initialize(model=model, optimizer=anchor, config=cfg)
    elif via == "plain":
        d8ds.install()
        engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        groups = param_groups(model) if job.get("temperature") else model.parameters()
        engine, _opt, _, _ = d8ds.initialize(model=model, model_parameters=groups, config=cfg)
    if job.get("resume"):
        d8ds.load_dist8_checkpoint(engine, job["resume"])
    if job.get("ds_load"):
        try:
            engine.load_checkpoint(job["ds_load"], **job.get("ds_load_kwargs", {}))
        except Exception as exc:  # noqa: BLE001 - "ds_load_refused": DeepSpeed's refusal is the result
            if not job.get("ds_load_refused"):
                raise
            with open(os.path.join(out_dir, f"{job['name']}-rank{rank}.json"), "w") as f:
                json.dump({"refused": str(exc)}, f)
            return
    losses = []
    t0 = time.time()
    first = job.get("first_step", 0)
    mb = GLOBAL_BATCH // world // gas
    refused = None
    late = job.get("late_override")
    late_values = None
    for step in range(first, first + job["steps"]):
        x, y = local_batch(step, rank, world)
        total = 0.0
        if late and step == late["step"]:  # an override made after the first step applies from the next
            import dist8

            target = dict(model.named_parameters())[late["param"]]
            dist8.GlobalOptimManager.get_instance().override_config(target, key_value_dict=late["config"])
            late_values = _full_values(model, cfg)
        if str(step) in job.get("bad_lr", {}):  # {step: value} written into the optimizer's groups, as user code may
            for group in engine.basic_optimizer.param_groups:
                group["lr"] = float(job["bad_lr"][str(step)])
        for m in range(gas):
            loss = engine(x[m * mb:(m + 1) * mb], y[m * mb:(m + 1) * mb])
            # loss_factor {step: f}: an fp16 overflow on purpose (1e30), which the step must skip
            engine.backward(loss * job.get("loss_factor", {}).get(str(step), 1.0))
            try:
                engine.step()
            except ValueError as exc:
                if "bad_lr" not in job and "late_override" not in job:
                    raise
                refused = str(exc)
                break
            total += float(loss.detach()) / gas
        if refused is not None:
            break
        t = torch.tensor([total])
        dist.all_reduce(t)
        losses.append(float(t) / world)
    elapsed = time.time() - t0
    moved = None
    if late_values is not None:  # which parameters moved after the override
        now = _full_values(model, cfg)
        moved = sorted(n for n in now if not torch.equal(now[n], late_values[n]))
        import dist8

        dist8.GlobalOptimManager.get_instance().initialize()  # the next job's model starts unmarked
    if job.get("weights_out"):  # the full trained parameters (ZeRO-3: gathered), rank 0 writes them
        from safetensors.torch import save_file

        full = _full_values(model, cfg)
        if rank == 0:
            save_file(full, os.path.join(out_dir, f"{job['name']}-weights.safetensors"))
    if job.get("save"):
        engine.save_checkpoint(job["save"], tag="final")
    opt = engine.basic_optimizer
    facts = {
        "refused": refused,
        "moved_after_override": moved,
        "losses": losses,
        "seconds": elapsed,
        "class": type(opt).__name__,
        "mro": [c.__name__ for c in type(opt).__mro__],
        "dtypes": {k: str(v) for k, v in opt.state_dtypes().items()} if hasattr(opt, "state_dtypes") else {},
        "state_bytes": opt.state_nbytes() if hasattr(opt, "state_nbytes") else None,  # None: not dist8
        "wrapper": type(engine.optimizer).__name__,
        "devices": sorted({str(p.device) for g in opt.param_groups for p in g["params"]}),
        "n_segments": sum(len(v) for v in (getattr(opt, "ds_segments", {}) or {}).values()),
        # DeepSpeed's ZeRO check as the engine calls it (False: "untested optimizer" warning)
        "zero_supported": deepspeed.runtime.engine.is_zero_supported_optimizer(opt),
    }
    if client is not None:  # DeepSpeed partitions and steps the instance passed in
        facts["client_stepped"] = opt is client and isinstance(client, dist8.AdamW8bit)
        facts["state_steps"] = sorted({st["step"] for st in client.state.values()})
        facts["lrs"] = [g["lr"] for g in client.param_groups]
    with open(os.path.join(out_dir, f"{job['name']}-rank{rank}.json"), "w") as f:
        json.dump(facts, f)
    engine.destroy() if hasattr(engine, "destroy") else None


def _full_values(model, cfg):
    """Every parameter's full values (ZeRO-3: gathered; collective then)."""
    import deepspeed

    stage3 = cfg["zero_optimization"]["stage"] == 3
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage3):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def main():
    spec = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    for job in spec["jobs"]:
        run_job(job, rank, world, out_dir)
        dist.barrier()
    # Every result is written and every rank is past the barrier. Leave without process-group /
    # interpreter teardown, as tests/dist_utils.py does: gloo's shutdown occasionally aborts
    # ("terminate called without an active exception") after all collectives have completed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()


def reference(steps, params, clip=1.0, cls_name="AdamW8bit", temperature=False, schedule=False):
    """The same training without DeepSpeed: one process, the full global batch, a plain dist8 optimizer
    (``temperature``: the model with one, in param_groups()' two groups; ``schedule``: the lr follows SCHEDULE)."""
    import dist8

    model = make_model(temperature=temperature)
    kw = {k: (tuple(v) if k == "betas" else v) for k, v in params.items() if v != "auto"}
    opt = dist8.get_optimizer_class(cls_name)(param_groups(model) if temperature else model.named_parameters(), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULE) if schedule else None
    losses = []
    for step in range(steps):
        x, y = batch(step)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss.detach()))
    return losses, opt
