"""ShardedOptimizer over a model whose trainable parameters change, and rebuilt over the same model.

Its block layout, flat buffers and stage-2 gradient hooks are fixed when it is built. What users do
around that -- unfreeze a backbone and ``add_param_group`` it (PyTorch Lightning's
``BackboneFinetuning``), unfreeze a parameter the optimizer was built without, build a second
optimizer over the same model (after unfreezing, a second ``train()``, a notebook cell run again),
drop one -- must either work exactly or be refused naming the parameter, losing nothing. Before:
the added or unfrozen parameters were silently never trained, and a second stage-2 optimizer's
second backward failed in the first one's hooks (which also kept its buffers alive).
"""
import gc
import re
import weakref

import pytest
import torch

import dist8
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64))


def _loss(model, rank, step):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * rank + step))
    return model(x.to(next(model.parameters()).dtype)).float().square().mean()


def _sharded(model, stage, **kw):
    return ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2, min_8bit_size=0, **kw)


def _train(model, opt, rank, world, steps, first=0):
    for step in range(first, first + steps):
        _loss(model, rank, step).backward()
        if opt.stage == 1 and world > 1:  # stage 1 takes averaged gradients (DDP's job)
            for p in model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        opt.step()
        opt.zero_grad()


def _refusals(rank, world, stage):
    model = _model()
    model[0].weight.requires_grad_(False)  # frozen when the optimizer is built: left out of its layout
    opt = _sharded(model, stage)
    out = {}
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": [model[0].weight], "lr": 1e-3})
    out["add"] = str(info.value)
    out["groups"] = len(opt.param_groups)
    _train(model, opt, rank, world, 1)
    model[0].weight.requires_grad_(True)  # unfrozen afterwards
    if rank == 0 or world == 1:
        before = [p.detach().clone() for p in model.parameters()]
        state = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for st in opt.inner.state.values()]
    _loss(model, rank, 1).backward()
    if rank == 1:  # a gradient on one rank only: every rank refuses (none waits in a collective)
        model[0].weight.grad = None
    if rank == 0 or world == 1:
        with pytest.raises(ValueError) as info:
            opt.step()
        out["step"] = str(info.value)
        out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and all(
            torch.equal(v, state[i][k]) for i, st in enumerate(opt.inner.state.values())
            for k, v in st.items() if torch.is_tensor(v))
    else:
        with pytest.raises(ValueError) as info:
            opt.step()
        out["step"] = str(info.value)
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_parameters_frozen_at_build_and_added_groups_are_refused_naming_them(stage, tmp_path):
    for out in run_ranks(_refusals, 2, stage, tmp_path=tmp_path):
        assert out["add"].startswith("ShardedOptimizer cannot add param group 1 (parameter 0.weight): its block "
                                     "layout is fixed when it is built") and out["groups"] == 1
        assert out["step"].startswith("parameter 0.weight did not require grad when the ShardedOptimizer was built")
        assert out.get("unchanged", True)


def _rebuilt(rank, world, stage):
    model, reference = _model(), _model()
    first = _sharded(model, stage)
    _train(model, first, rank, world, 2)
    reference.load_state_dict(model.state_dict())
    # a second optimizer over the same parameters, the first still alive (as a scheduler or a
    # trainer would keep it): it takes the parameters over
    second = _sharded(model, stage)
    _train(model, second, rank, world, 3, first=2)
    _train(reference, _sharded(reference, stage), rank, world, 3, first=2)
    out = {"same": all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))}
    _loss(model, rank, 9).backward()
    with pytest.raises(RuntimeError) as info:
        first.step()
    out["old_step"] = str(info.value)
    del info  # its traceback holds the first optimizer's frames
    second.zero_grad()
    # dropped, its buffers are freed (the parameters' hooks hold them weakly); a third one over a
    # parameter the second is laid out in is refused nothing
    buffers = weakref.ref(first.buffers[0].flat)
    grads = weakref.ref(first.stage2_grads) if first.stage2_grads is not None else None
    del first
    gc.collect()
    out["freed"] = buffers() is None and (grads is None or grads() is None)
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_a_rebuilt_optimizer_takes_the_parameters_over(stage, tmp_path):
    for out in run_ranks(_rebuilt, 2, stage, tmp_path=tmp_path):
        assert out["same"], "the second optimizer's run differs from a fresh optimizer's"
        assert out["old_step"].startswith("this ShardedOptimizer was superseded: a newer one was built over its "
                                          "parameter 0.weight")
        assert out["freed"]


@pytest.mark.parametrize("stage", [1, 2])
def test_parameters_removed_from_or_put_in_param_groups_by_hand_are_refused_and_freezing_works(stage):
    """Removing a parameter from ``param_groups`` (torch's optimizers then stop training it) left it trained,
    silently (moved 0.011 at lr 1e-2 the next step), and one put in was never trained: both are refused
    naming the parameter, nothing updated. A reorder changes nothing; freezing a parameter skips it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2, stage=stage)

    def step():
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        opt.zero_grad()

    step()
    group = opt.param_groups[0]
    before = [p.detach().clone() for p in model.parameters()]
    for edit, message in [(lambda: group["params"][2:], "parameter 0.weight was removed from param group 0"),
                          (lambda: [*group["params"], torch.nn.Parameter(torch.zeros(3))],
                           "parameter of shape (3,) was put in param group 0")]:
        kept, group["params"] = group["params"], edit()
        refusal = rf"^{re.escape(message)} after the ShardedOptimizer was built: .*requires_grad_"
        with pytest.raises(ValueError, match=refusal):
            step()
        opt.zero_grad()
        group["params"] = kept
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    group["params"].reverse()  # the layout does not depend on the order
    step()
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    opt.param_groups.append(dict(group, params=[]))
    with pytest.raises(ValueError, match=r"^ShardedOptimizer was built with 1 param groups and now has 2"):
        step()


def test_a_dropped_stage2_optimizer_frees_its_gradient_buffers():
    model = _model()
    opt = _sharded(model, 2)
    _train(model, opt, 0, 1, 1)
    grads = weakref.ref(opt.stage2_grads)
    del opt
    gc.collect()
    assert grads() is None
    _loss(model, 0, 1).backward()  # its hooks, still on the parameters, do nothing
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("recast", ["to-bf16", "half", "one-module"])
def test_a_model_cast_after_the_optimizer_was_built_is_refused_naming_the_parameter(stage, recast):
    """Parameters are views of the optimizer's flat buffers; ``model.to(dtype)`` (or ``.cuda()``) after
    building gives them new storage. Stage 2 then trained nothing, silently; stage 1 failed on a
    gradient dtype. Now refused at the step naming the parameter, nothing updated."""
    model = _model()
    opt = _sharded(model, stage)
    {"to-bf16": lambda: model.to(torch.bfloat16), "half": model.half, "one-module": model[2].half}[recast]()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 64, dtype=model[0].weight.dtype)
    model[2](model[1](model[0](x)).to(model[2].weight.dtype)).float().square().mean().backward()
    which = "2.weight" if recast == "one-module" else "0.weight"
    with pytest.raises(RuntimeError, match=f"^parameter {which} no longer lives in the ShardedOptimizer's flat buffer"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _copied(rank, world, stage, when):
    moved, still = _model(), _model()
    opt_moved, opt_still = _sharded(moved, stage), _sharded(still, stage)
    if when == "after build":
        moved.to("cpu:0")
    for step in range(3):
        for model in (moved, still):
            _loss(model, rank, step).backward()
            if stage == 1 and world > 1:
                for p in model.parameters():
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        if when == "between backward and step" and step == 1:
            moved.to("cpu:0")
        for opt in (opt_moved, opt_still):
            opt.step()
            opt.zero_grad()
    return {"same": all(torch.equal(a, b) for a, b in zip(moved.parameters(), still.parameters())),
            "trained": not torch.equal(moved[0].weight, _model()[0].weight),
            "views": all(p.data_ptr() == q for p, q in zip(opt_moved.params, opt_moved._storage))}


@pytest.mark.parametrize("when", ["after build", "between backward and step"])
@pytest.mark.parametrize("stage", [1, 2])
def test_a_copy_with_the_same_values_is_taken_back(stage, when, tmp_path):
    """accelerate's ``prepare`` (HF Trainer's too) does ``model.to("cpu:0")`` after the optimizer was
    built, which copies every CPU tensor -- parameters and gradients (``param.grad.data``, the very
    view object stage 2 hands out) -- with the same values, dtype and device. The copies are taken back
    into the flat buffers and training is bitwise the run without them, on 1 and 2 ranks (before: the
    model never trained)."""
    assert _copied(0, 1, stage, when) == {"same": True, "trained": True, "views": True}
    for out in run_ranks(_copied, 2, stage, when, tmp_path=tmp_path):
        assert out == {"same": True, "trained": True, "views": True}


@pytest.mark.parametrize("bits", [None, 24])
def test_weights_loaded_into_replaced_parameters_are_taken_back_and_restart_the_masters(bits):
    """Weights a client loads into the copies ``prepare`` made (accelerate's ``load_state`` in a new
    process) put other values in the parameters' place: they are taken back, and their 16-bit
    parameters' fp32 master copies (``bits=None``) or corrections (``master_weight_bits=24``) restart
    from them, as for weights loaded into a 16-bit model. Before, the step refused them (and before
    that, trained nothing)."""
    model = _model().to(torch.bfloat16)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=1, lr=1e-2, min_8bit_size=0,
                           master_weight_bits=bits)
    for step in range(2):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).bfloat16()
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    if bits is None:
        assert any(not torch.equal(m, b.owned(0).float()) for m, b in zip(opt.masters, opt.buffers) if m is not None)
    else:
        assert any(st["correction"].any() for st in opt.inner.state.values())
    new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.to("cpu:0")  # copies
    model.load_state_dict(new)  # into the copies
    opt.adopt_parameters()
    assert all(torch.equal(p, new[n]) for n, p in model.named_parameters())
    assert all(p.data_ptr() == q for p, q in zip(opt.params, opt._storage))
    for master, buf in zip(opt.masters, opt.buffers):
        if master is not None:
            assert torch.equal(master, buf.owned(0).float())
    assert all(not st["correction"].any() for st in opt.inner.state.values() if "correction" in st)
    assert (bits is None) == all(m is not None for m in opt.masters)


def test_a_dist8_checkpoint_loaded_into_copied_parameters_continues_exactly(tmp_path):
    """``dist8.checkpoint.load`` into a model whose parameters were copied after the optimizer was built
    (accelerate's ``prepare``) takes them back before it loads the weights, so the checkpoint's fp32
    master copies of bf16 parameters are kept (taken back after, the masters would restart from the
    bf16 weights)."""
    def build():
        model = _model().to(torch.bfloat16)
        return model, ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=1, lr=1e-2, min_8bit_size=0)

    def train(model, opt, steps):
        for step in steps:
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step)).bfloat16()
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    train(model, opt, range(3))
    dist8.checkpoint.save(tmp_path / "ckpt", model, opt, step=3)
    train(model, opt, range(3, 6))
    resumed, opt2 = build()
    resumed.to("cpu:0")  # copies every parameter
    dist8.checkpoint.load(tmp_path / "ckpt", resumed, opt2)
    train(resumed, opt2, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_fp32_weights_loaded_after_the_parameters_were_copied_reach_the_model():
    """``load_fp32_master`` (``dist8.checkpoint.load_fp32_weights``) writes the flat buffers: into
    parameters a client copied, the values would have stayed in the buffers and the copies' old
    values been taken back at the step."""
    model = _model().to(torch.bfloat16)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=1, lr=1e-2, min_8bit_size=0,
                           master_weight_bits=24)
    model.to("cpu:0")
    weights = {i: torch.randn(p.shape) for i, p in enumerate(opt.params)}
    opt.load_fp32_master(weights)
    opt.adopt_parameters()
    for i, p in enumerate(opt.params):
        assert torch.equal(p, weights[i].bfloat16()), opt.names[i]


def _bf16_model(seed=0):
    return _model(seed).to(torch.bfloat16)


def _written_in_place(rank, world, stage):
    """Each way a client writes 16-bit parameters in place, against the run that did not need to."""
    pretrained = _bf16_model(seed=5).state_dict()
    out = {}
    # weights loaded after the optimizer was built: through the parameters (version counter) and
    # through .data (no counter moves; the first step's comparison finds it) == loaded before building
    for how in ("load_state_dict", "data_copy"):
        late = _bf16_model()
        opt = _sharded(late, stage)
        if how == "load_state_dict":
            late.load_state_dict(pretrained)
        else:
            for name, p in late.named_parameters():
                p.data.copy_(pretrained[name])
        _train(late, opt, rank, world, 2)
        early = _bf16_model()
        early.load_state_dict(pretrained)
        _train(early, _sharded(early, stage), rank, world, 2)
        out[how] = all(torch.equal(a, b) for a, b in zip(late.parameters(), early.parameters()))
    # a resume from torch-format state dicts (HF Trainer, accelerate, DCP: no fp32 masters in them),
    # optimizer state first, then the model == the model first, then an optimizer built on it
    model = _bf16_model()
    opt = _sharded(model, stage)
    _train(model, opt, rank, world, 2)
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_sd = opt.state_dict()
    resumed = _bf16_model()
    opt_resumed = _sharded(resumed, stage)
    opt_resumed.load_state_dict(opt_sd)
    resumed.load_state_dict(model_sd)
    _train(resumed, opt_resumed, rank, world, 2, first=2)
    reference = _bf16_model()
    reference.load_state_dict(model_sd)
    opt_reference = _sharded(reference, stage)
    opt_reference.load_state_dict(opt_sd)
    _train(reference, opt_reference, rank, world, 2, first=2)
    out["resume"] = all(torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))
    # a constraint applied in place mid-training (clamp under no_grad) stays: a step with lr 0 moves nothing
    with torch.no_grad():
        for p in reference.parameters():
            p.clamp_(-0.05, 0.05)
    clamped = [p.detach().clone() for p in reference.parameters()]
    for group in opt_reference.param_groups:
        group["lr"] = 0.0
    _train(reference, opt_reference, rank, world, 1, first=4)
    out["clamp"] = all(torch.equal(a, b) for a, b in zip(reference.parameters(), clamped))
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_16bit_parameters_written_in_place_after_building_are_what_the_step_continues_from(stage, tmp_path):
    """bf16 parameters keep fp32 master copies; the step wrote their rounding over whatever was in the
    parameters, so weights loaded in place after the optimizer was built (``model.load_state_dict``, a
    resume from torch-format state dicts, which hold no masters), or a clamp under ``no_grad``, were
    undone by the next step: the model went back to the values it had when the optimizer was built,
    silently (``lr=1e-3``: 0.0015 from the initial weights, 0.25 from the loaded ones). Now the masters
    follow parameters written in place, on 1 and 2 ranks, bitwise the run that loaded before building."""
    want = {"load_state_dict": True, "data_copy": True, "resume": True, "clamp": True}
    assert _written_in_place(0, 1, stage) == want
    for out in run_ranks(_written_in_place, 2, stage, tmp_path=tmp_path):
        assert out == want
