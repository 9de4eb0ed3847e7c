"""FSDP2 ranks that differ are refused on every rank before anything is updated (2 gloo ranks).

torch's AdamW has no collectives in its step, so under FSDP2 a rank that differs just steps
differently; dist8's step runs collectives (partial sums, shard-edge blocks, checkpoint saves),
which such a rank paired up wrongly: a hang, a gloo mismatch, or state saved under rank 0's
settings. ``dist8.optim.dtensor.agree_on_step`` makes each a one-line error on every rank:

* a gradient set to None on one rank only (a parameter with no gradient on every rank is skipped
  as before);
* block_size, optim_bits, min_8bit_size or quant_map different on one rank;
* in steady state nothing is gathered (one small all-reduce per step), also while an LR
  scheduler changes ``lr`` every step;
* ``optim_bits`` or percentile clipping set after the first step, on every rank: refused on every
  rank (under gradient release in the forward, before the backward steps anything).
"""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks

pytest.importorskip("torch.distributed.fsdp", reason="these tests agree over FSDP2 (fully_shard) ranks")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SETTINGS = {  # rank 1's setting -> the expected message
    "block_size": ({"block_size": 128}, "AdamW8bit: block_size is 256 on rank 0 but 128 on rank 1;"),
    "optim_bits": ({"optim_bits": 32}, "AdamW8bit: optim_bits of parameter l1.weight is 8 on rank 0 but 32 on rank 1;"),
    "min_8bit_size": ({"min_8bit_size": 10**9},
                      "AdamW8bit: min_8bit_size of parameter l1.weight is 0 on rank 0 but 1000000000 on rank 1;"),
    "quant_map": ({"quant_map": "linear"}, "AdamW8bit: quant_map is 'dynamic' on rank 0 but 'linear' on rank 1;"),
}


LATE = {"optim_bits": 32, "percentile_clipping": 5}  # set after the first step -> what the state lacks
LATE_SAYS = {"optim_bits": "parameter l1.weight has 8-bit state but its settings now give it 32-bit state",
             "percentile_clipping": "parameter l1.weight has percentile_clipping=5 but its state has no gradient-norm"}


def _worker(rank, world_size):
    import faulthandler

    from torch.distributed.fsdp import fully_shard

    import dist8
    from fsdp_utils import DcpModel, mesh_of

    faulthandler.dump_traceback_later(45, exit=True)  # a rank left waiting: a failure, not a hang

    def build(**kw):
        model = DcpModel()  # its parameter e takes no part in the forward: no gradient on any rank
        fully_shard(model, mesh=mesh_of(world_size))
        return model, dist8.AdamW8bit(model.named_parameters(), **{"lr": 1e-2, "min_8bit_size": 0, **kw})

    def backward(model, seed):
        x = torch.randn(8, 100, generator=torch.Generator().manual_seed(seed))[rank * 4:(rank + 1) * 4]
        model(x).square().mean().backward()

    def snapshot(model, opt):
        params = [p.detach().to_local().clone() for p in model.parameters()]
        state = [(k, v.clone() if isinstance(v, torch.Tensor) else v)
                 for st in opt.state.values() for k, v in st.items()]
        return params, state

    def same(a, b):
        return len(a) == len(b) and all(
            ka == kb and (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb)
            for (ka, va), (kb, vb) in zip(a, b))

    def refused_step(model, opt):
        (params, state) = snapshot(model, opt)
        try:
            opt.step()
            error = None
        except (ValueError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        after_params, after_state = snapshot(model, opt)
        unchanged = all(torch.equal(a, b) for a, b in zip(params, after_params)) and same(state, after_state)
        return error, unchanged

    def one_step_then_gradients():
        model, opt = build()
        backward(model, 0)
        opt.step()
        opt.zero_grad()
        backward(model, 1)
        return model, opt

    out = {}
    model, opt = one_step_then_gradients()
    if rank == 1:
        model.l1.weight.grad = None
    out["gradnone"] = refused_step(model, opt)
    opt.zero_grad()
    backward(model, 2)
    opt.step()  # every rank has its gradients again: the step runs
    out["recovered"] = opt.state[model.l1.weight]["step"]

    # a bad value written into one rank's groups only: its own check refused the step while the other rank
    # waited in the agreement's collective (a hang under NCCL)
    model, opt = one_step_then_gradients()
    if rank == 0:
        opt.param_groups[0]["lr"] = float("nan")
    out["one rank's lr"] = refused_step(model, opt)

    # a change after the first step that the state cannot follow, made on every rank (override_config)
    mng = dist8.GlobalOptimManager.get_instance()
    for key, value in LATE.items():
        model, opt = one_step_then_gradients()
        mng.override_config(model.l1.weight, key, value)
        out["late " + key] = refused_step(model, opt)
        mng.initialize()
        # the same under gradient release: refused in the forward, before the backward steps anything
        model, opt = build()
        handle = dist8.gradient_release(model, opt)
        backward(model, 0)
        mng.override_config(model.l1.weight, key, value)
        params = [p.detach().to_local().clone() for p in model.parameters()]
        try:
            backward(model, 1)
            out["late released " + key] = None
        except ValueError as exc:
            out["late released " + key] = str(exc)
        out["late released unchanged " + key] = all(
            torch.equal(a, p.detach().to_local()) for a, p in zip(params, model.parameters()))
        handle.remove()
        mng.initialize()

    for case, (kw, _) in SETTINGS.items():
        model, opt = build(**(kw if rank == 1 else {}))
        backward(model, 0)
        out[case] = refused_step(model, opt)
        out[case + " no state"] = not opt.state

    model, opt = build()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    gathers = []
    gather = dist.all_gather_object
    dist.all_gather_object = lambda *a, **k: (gathers.append(1), gather(*a, **k))[1]
    try:
        for s in range(4):
            backward(model, s)
            if s == 2:
                model.l1.weight.grad = None  # on every rank: not stepped, as before
            opt.step()
            sched.step()
            opt.zero_grad()
    finally:
        dist.all_gather_object = gather
    out["steady gathers"] = len(gathers)
    out["steady steps"] = (opt.state[model.l1.weight]["step"], opt.state[model.l2.weight]["step"])

    # gradient release: per-parameter updates inside backward agree once per parameter, not per update,
    # also while a scheduler changes lr at every step (a new key per step would be a collective per
    # parameter per step, and a set that grows without end)
    model, opt = build()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    handle = dist8.gradient_release(model, opt)
    keys = []
    for s in range(4):
        backward(model, s)
        opt.step()
        sched.step()
        keys.append(len(opt.reduce_partials.agreed_keys))
    handle.remove()
    out["release keys"] = keys
    return out


def test_ranks_that_differ_are_refused_on_every_rank(tmp_path):
    r0, r1 = run_ranks(_worker, 2, tmp_path=tmp_path)
    for out in (r0, r1):
        assert out["release keys"][0] > 0 and len(set(out["release keys"])) == 1, out["release keys"]
    bad_lr = "lr must be a finite number (param group 0), got nan"
    assert r0["one rank's lr"] == (f"ValueError: {bad_lr}", True), r0["one rank's lr"]
    assert r1["one rank's lr"] == (f"RuntimeError: AdamW8bit.step() failed on rank 0: {bad_lr}", True), \
        r1["one rank's lr"]
    expected = {"gradnone": "RuntimeError: parameter l1.weight has a gradient on rank 0 but none on rank 1;"}
    expected.update({case: "ValueError: " + message for case, (_, message) in SETTINGS.items()})
    for case, start in expected.items():
        for out in (r0, r1):
            error, unchanged = out[case]
            assert error is not None and error.startswith(start), (case, error)
            assert "\n" not in error and error.endswith("nothing was updated"), (case, error)
            assert unchanged, f"{case}: a refused step changed a parameter or the state"
        assert r0[case][0] == r1[case][0], case
    for case in SETTINGS:
        assert r0[case + " no state"] and r1[case + " no state"], case
    for key in LATE:  # FSDP2 holds a shard of every parameter on every rank: each refuses it itself
        for out in (r0, r1):
            error, unchanged = out["late " + key]
            assert error is not None and LATE_SAYS[key] in error and unchanged, (key, error)
            assert out["late released " + key].startswith(LATE_SAYS[key]), out["late released " + key]
            assert out["late released unchanged " + key], key
    assert r0["recovered"] == r1["recovered"] == 2
    assert r0["steady gathers"] == r1["steady gathers"] == 0
    assert r0["steady steps"] == r1["steady steps"] == (3, 4)
