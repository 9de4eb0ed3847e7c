"""ShardedOptimizer: refusals that change nothing on any rank (loads, stage-1 gradients), step hooks run
once around the whole step, and zero_grad(set_to_none=False) keeping a missing gradient missing."""
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import dist8
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks

HANG_S = 90  # a rank left waiting in a collective fails the test in this many seconds, with its stack


def _model_and_opt(stage=2, **kw):
    """Two Linear(64, 64) in two param groups: on 2 ranks, rank 0 owns 0.*, rank 1 owns 1.*."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    groups = [{"params": list(model[0].named_parameters(prefix="0"))},
              {"params": list(model[1].named_parameters(prefix="1")), "lr": 2e-3}]
    return model, ShardedOptimizer(groups, dist8.AdamW8bit, stage=stage, min_8bit_size=0, weight_decay=0.1, **kw)


def _backward(model, k):
    """The same batch on every rank: the average of the ranks' gradients is this one (stage 1 needs no DDP)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(10 + k))
    model(x).pow(2).sum().backward()


def _train(model, opt, steps):
    for k in steps:
        _backward(model, k)
        opt.step()
        opt.zero_grad()


def _same(a, b):
    """Deep bitwise equality of state dicts / lists of tensors (NaN equal to NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _spoil(sd, how):
    """Spoil the state of the 4th parameter (1.bias, owned by the last rank) of a state dict in place;
    the first group's lr changes too (it must not be installed either)."""
    key = 3  # its index in either format (the unsharded optimizer's, and the layout's of a shard)
    if how == "nan absmax":
        sd["state"][key]["absmax1"][0] = float("nan")
    else:  # codes cast by a state-dict conversion
        sd["state"][key]["state1"] = sd["state"][key]["state1"].to(torch.int8)
    sd["param_groups"][0]["lr"] = 5e-3


def _watched(rank, world_size, fn, *args):
    """``fn(rank, world_size, *args)`` on a rank, where a hang ends the rank in HANG_S seconds with its stack."""
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)
    try:
        return fn(rank, world_size, *args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _refused_load(rank, world_size, fmt, how):
    saved_model, saved = _model_and_opt(full_state_dict=fmt == "full")
    _train(saved_model, saved, range(3))
    sd = copy.deepcopy(saved.state_dict())
    if fmt == "full" or rank == world_size - 1:  # a shard holds 1.bias on the last rank only
        _spoil(sd, how)
    model, opt = _model_and_opt()
    _train(model, opt, [0])
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    with pytest.raises((ValueError, KeyError)) as refused:
        opt.load_state_dict(sd)
    unchanged = _same(before, (opt.state_dict(), list(model.parameters())))
    _train(model, opt, [1, 2])  # continues as if the load had not been tried
    clean_model, clean = _model_and_opt()
    _train(clean_model, clean, [0, 1, 2])
    return {"error": str(refused.value), "unchanged": unchanged,
            "continued": _same([clean.state_dict(), [p.detach() for p in clean_model.parameters()]],
                               [opt.state_dict(), [p.detach() for p in model.parameters()]])}


@pytest.mark.parametrize("how", ["nan absmax", "int8 codes"])
@pytest.mark.parametrize("fmt", ["shard", "full"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_refused_load_changes_nothing_on_any_rank(world_size, fmt, how, tmp_path):
    """Pieces used to be checked and installed one by one, so a load refused on the 4th parameter had
    already replaced the first three's state; on 2 ranks the rank without the bad blocks loaded while
    the other refused. Now every rank refuses (the others naming the rank), with its state_dict and
    parameters unchanged, and training continues bitwise as if the load had not been tried."""
    if world_size == 1:
        results = [_refused_load(0, 1, fmt, how)]
    else:
        results = run_ranks(_watched, world_size, _refused_load, fmt, how, tmp_path=tmp_path)
    what = "absmax1 of parameter 1.bias holds NaN" if how == "nan absmax" else "state1 of parameter 1.bias has dtype"
    for rank, res in enumerate(results):
        assert res["error"].startswith(what if rank == world_size - 1 else
                                       f"ShardedOptimizer.load_state_dict failed on rank {world_size - 1}: {what}")
        assert res["unchanged"] and res["continued"], (rank, res)


def _mixed_saves(rank, world_size):
    """Each rank loads a state dict of another save (``how``) than rank 0: refused on every rank."""
    saved_model, saved = _model_and_opt()
    _train(saved_model, saved, range(3))
    after3 = copy.deepcopy(saved.state_dict())
    _train(saved_model, saved, range(3, 5))
    after5 = copy.deepcopy(saved.state_dict())
    with_lr = copy.deepcopy(after3)
    with_lr["param_groups"][1]["lr"] = 5e-3  # written into one rank's file by hand, or saved by another run
    saved.full_state_dict = True  # the whole state on every rank (collective)
    full = copy.deepcopy(saved.state_dict())
    saved.full_state_dict = False
    model, opt = _model_and_opt()
    _train(model, opt, [0])
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    errors = {}
    for how, other in (("steps", after5), ("lr", with_lr), ("format", full)):
        try:
            opt.load_state_dict(after3 if rank == 0 else other)
        except ValueError as exc:
            errors[how] = str(exc)
    unchanged = _same(before, (opt.state_dict(), list(model.parameters())))
    opt.load_state_dict(after5)  # one save on every rank: loads, and the step count comes with it
    return {"errors": errors, "unchanged": unchanged, "steps": (saved.steps_taken, opt.steps_taken),
            "saved_steps": after5["steps"]}


def test_state_dicts_of_different_saves_are_refused_on_every_rank(tmp_path):
    """Each rank loads its own shard file: one left from another save (another step, another lr) loaded
    without a word, each rank then stepping its blocks from another point. The shard dict records the
    optimizer's steps; every rank compares steps, param-group values and format, and refuses alike."""
    results = run_ranks(_watched, 2, _mixed_saves, tmp_path=tmp_path)
    start = "ShardedOptimizer.load_state_dict: "
    fix = ": load the state dicts of one save on every rank (nothing was loaded)"
    for res in results:
        assert res["errors"] == {
            "steps": f"{start}the ranks' shard state dicts were saved after different numbers of steps "
                     f"(rank 0's after 3, rank 1's after 5){fix}",
            "lr": f"{start}param group 1's lr is 0.002 in rank 0's state dict and 0.005 in rank 1's{fix}",
            "format": f"{start}the ranks were given different formats (rank 0 a shard one, rank 1 a full one){fix}",
        }
        assert res["unchanged"]
        assert res["steps"] == (5, 5) and res["saved_steps"] == 5


def _late_override(rank, world_size, key, value, default):
    """``override_config`` after the first step on a parameter whose blocks are rank 1's only."""
    from dist8.optim import GlobalOptimManager

    mng = GlobalOptimManager.get_instance()
    try:
        model, opt = _model_and_opt()
        _train(model, opt, [0])
        mng.override_config(model[1].weight, key, value)
        _backward(model, 1)
        before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
        try:
            opt.step()
            error = None
        except ValueError as exc:
            error = str(exc)
        unchanged = _same(before, (opt.state_dict(), list(model.parameters())))
        mng.override_config(model[1].weight, key, default)  # taken back: the ranks step on together
        opt.step()
        return {"error": error, "unchanged": unchanged, "steps": opt.steps_taken}
    finally:
        mng.initialize()


@pytest.mark.parametrize("key,value,default", [("optim_bits", 32, 8), ("percentile_clipping", 5, 100)])
def test_a_change_after_the_first_step_the_state_cannot_follow_is_refused_on_every_rank(key, value, default,
                                                                                         tmp_path):
    """The inner step refused it (naming the parameter) on the rank owning the parameter's blocks only; the
    other rank went on into the step's collectives and waited there until the process group's timeout."""
    results = run_ranks(_watched, 2, _late_override, key, value, default, tmp_path=tmp_path)
    what = ("parameter 1.weight has 8-bit state but its settings now give it 32-bit state" if key == "optim_bits"
            else "parameter 1.weight has percentile_clipping=5 but its state has no gradient-norm history")
    fix = "make such a change before the first step, or take it back (ShardedOptimizer keeps the state by piece"
    for rank, res in enumerate(results):
        prefix = "" if rank == 1 else "ShardedOptimizer.step failed on rank 1: "
        assert res["error"].startswith(prefix + what) and fix in res["error"], res["error"]
        assert res["unchanged"] and res["steps"] == 2


def _unusable_stage1_gradient(rank, world_size, how):
    model, opt = _model_and_opt(stage=1)
    _train(model, opt, [0])
    _backward(model, 1)
    w = model[1].weight  # its blocks are rank 1's: only rank 1 looked at its gradient before
    good = w.grad
    if how == "sparse":
        w.grad = good.to_sparse()
    else:  # torch refuses these assigned to .grad; a hook or a cast in place (.data) gets them there
        w.grad = good.clone()
        w.grad.data = good.double() if how == "float64" else good.reshape(-1).clone()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    errors = {}
    for call in ("step", "clip_grad_norm"):
        try:
            opt.step() if call == "step" else opt.clip_grad_norm(1.0)
        except (TypeError, ValueError) as exc:
            errors[call] = (type(exc).__name__, str(exc))
    unchanged = _same(before, (opt.state_dict(), [p.detach().clone() for p in model.parameters()]))
    w.grad = good
    opt.step()  # and the ranks still meet in the same collectives
    return {"errors": errors, "unchanged": unchanged}


@pytest.mark.parametrize("how", ["sparse", "float64", "shape"])
def test_stage1_refuses_an_unusable_gradient_on_every_rank(how, tmp_path):
    """Stage 1 checked a gradient only on the rank owning its blocks, in torch's words ("reshape is not
    implemented for sparse tensors"), while the other rank went on into the step's collectives; a
    gradient of another shape with as many elements was sliced silently. Now every rank refuses it
    before any collective, naming the parameter as the unsharded optimizer does; nothing is updated."""
    expected = {"sparse": ("TypeError", "parameter 1.weight has a sparse gradient; dist8 needs dense gradients"),
                "float64": ("TypeError", "parameter 1.weight has a torch.float64 gradient; supported: float32, "
                                         "bfloat16, float16"),
                "shape": ("ValueError", "parameter 1.weight has shape (64, 64) but its gradient (4096,)")}[how]
    for rank, res in enumerate(run_ranks(_watched, 2, _unusable_stage1_gradient, how, tmp_path=tmp_path)):
        assert res["errors"] == {"step": expected, "clip_grad_norm": expected}, rank
        assert res["unchanged"], rank


def _sparse_embedding(rank, world_size):
    out = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(64, 16, sparse=sparse), torch.nn.Linear(16, 4))
        opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=2, min_8bit_size=0)
        for step in range(2):
            ids = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:8]  # no repeats: sums exact
            model(ids).square().sum().backward()
            opt.step()
            opt.zero_grad()
        out[sparse] = [p.detach().clone() for p in model.parameters()]
    return out


def test_stage2_still_takes_sparse_gradients(tmp_path):
    """Stage 2 copies each gradient into its flat buffer, a sparse one too (Embedding(sparse=True)):
    stage 1's refusal of sparse gradients is not stage 2's; the step is the dense embedding's."""
    for rank, res in enumerate(run_ranks(_watched, 2, _sparse_embedding, tmp_path=tmp_path)):
        assert all(torch.equal(a, b) for a, b in zip(res[True], res[False])), rank


def _step_hooks(rank, world_size, stage):
    model, opt = _model_and_opt(stage=stage)
    w = model[1].weight  # updated by rank 1: on rank 0 it changes at the all-gather only
    seen = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("pre", type(o).__name__,
                                                                             w.detach().clone()))),
               register_optimizer_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__,
                                                                              w.detach().clone()))),
               opt.register_step_post_hook(lambda o, a, k: seen.append(("own post", type(o).__name__,
                                                                        w.detach().clone())))]
    try:
        before = w.detach().clone()
        _train(model, opt, [0, 1])
    finally:
        for handle in handles:
            handle.remove()
    return {"seen": [(when, kind) for when, kind, _ in seen],
            "pre_sees_before": torch.equal(seen[0][2], before),
            "post_sees_final": all(torch.equal(value, w.detach()) for when, _, value in seen[-2:])}


@pytest.mark.parametrize("stage", [1, 2])
def test_step_hooks_run_once_per_step_and_post_hooks_see_the_gathered_parameters(stage, tmp_path):
    """The inner optimizer's step was called through torch's hook-running wrapper: global step hooks
    ran twice per step, the first post hook before the all-gather, with half-updated parameters."""
    once = [("pre", "ShardedOptimizer"), ("own post", "ShardedOptimizer"), ("post", "ShardedOptimizer")]
    for rank, res in enumerate(run_ranks(_watched, 2, _step_hooks, stage, tmp_path=tmp_path)):
        assert res["seen"] == once * 2, rank
        assert res["pre_sees_before"] and res["post_sees_final"], rank


class _ThreeLayers(torch.nn.Module):
    """``a`` trains every step, ``b`` at the first only, ``unused`` never."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.unused = torch.nn.Linear(16, 64), torch.nn.Linear(16, 64), torch.nn.Linear(16, 300)

    def forward(self, x, step):
        return self.a(x) + self.b(x) if step == 0 else self.a(x)


def _train_keeping_gradients(make_opt, steps=3):
    model = _ThreeLayers()
    opt = make_opt(model)
    for step in range(steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))  # the same on every rank
        model(x, step).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return model, opt


def _zero_grad_keeping(rank, world_size):
    out = {}
    for stage in (1, 2):
        model, opt = _train_keeping_gradients(lambda m: ShardedOptimizer(
            m.named_parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2, weight_decay=0.1, min_8bit_size=0))
        out[stage] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                      "unused_state": [p in opt.state for p in model.unused.parameters()]}
    return out


def test_zero_grad_keeping_gradients_does_not_step_parameters_that_had_none(tmp_path):
    """Stage 2's zero_grad(set_to_none=False) marked every parameter as holding a (zero) gradient, so a
    parameter backward never reached was stepped (weight decay moved it, state was made). As torch and
    the unsharded optimizer: a missing gradient stays missing, one that was there is kept (zeroed) and
    stepped. Bitwise the unsharded optimizer's run, on both stages."""
    ref_model, _ = _train_keeping_gradients(lambda m: dist8.AdamW8bit(
        m.named_parameters(), lr=1e-2, weight_decay=0.1, min_8bit_size=0))
    start = _ThreeLayers()
    assert not torch.equal(ref_model.b.weight, start.b.weight)  # b keeps a zero gradient: stepped by torch's rule
    for rank, res in enumerate(run_ranks(_watched, 2, _zero_grad_keeping, tmp_path=tmp_path)):
        for stage in (1, 2):
            for n, p in ref_model.named_parameters():
                assert torch.equal(res[stage]["params"][n], p.detach()), (rank, stage, n)
            assert torch.equal(res[stage]["params"]["unused.weight"], start.unused.weight.detach())
            assert res[stage]["unused_state"] == [False, False], (rank, stage)
