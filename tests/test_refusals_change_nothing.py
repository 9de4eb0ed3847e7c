"""A refused call leaves the optimizer as it was, and copies step themselves.

The project's rule for bad input is a one-line error that loses nothing: after the exception the
optimizer's state and param groups and the parameters are exactly as before, and a run that fixes the
input and goes on equals one that never made the bad call (bitwise). These cases were found by an
audit that made the bad call in the middle of a step or a load (the 3rd of 5 parameters, the 2nd
group): before, parameters checked earlier already had fresh state, a counted step or a dropped
master-weight correction, a load under ``-W error`` had replaced group 0's values, and a checkpoint
load kept a parameter's stale state. Copies (``copy.deepcopy``, ``torch.save``) of an optimizer whose
``step`` an LR scheduler had wrapped stepped the original, and DeepSpeed was handed such a copy.
"""
import copy
import io
import warnings

import pytest
import torch

import dist8
from dist8.optim import GlobalOptimManager

SHAPES = ((64, 80), (80,), (48, 96), (96,), (32, 64))


def build(shapes=SHAPES, dtype=torch.float32, **kw):
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    kw.setdefault("min_8bit_size", 0)
    return params, dist8.AdamW8bit([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}], **kw)


def give_grads(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def snapshot(opt, params):
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    return buf.getvalue()


def same(a, b) -> bool:
    """Bitwise equality of two snapshots' tensors and values."""
    def flat(x, out, path=""):
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                flat(x[k], out, f"{path}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                flat(v, out, f"{path}/{i}")
        else:
            out.append((path, x))
        return out
    fa = flat(torch.load(io.BytesIO(a), weights_only=True), [])
    fb = flat(torch.load(io.BytesIO(b), weights_only=True), [])
    if [k for k, _ in fa] != [k for k, _ in fb]:
        return False
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y for (_, x), (_, y) in zip(fa, fb))


def clean_run(steps, **kw):
    params, opt = build(**kw)
    for k in range(steps):
        give_grads(params, k)
        opt.step()
    return snapshot(opt, params)


@pytest.mark.parametrize("case", ["first_step", "empty_param", "master_weight_bits"])
def test_a_refused_step_changes_nothing_and_the_fixed_run_is_the_clean_one(case):
    kw = {}
    if case == "empty_param":
        kw["shapes"] = ((0,),) + SHAPES[1:]
    if case == "master_weight_bits":
        kw.update(dtype=torch.bfloat16, master_weight_bits=24)
    params, opt = build(**kw)
    start = 0 if case == "first_step" else 1
    for k in range(start):
        give_grads(params, k)
        opt.step()
    give_grads(params, start)
    if case == "master_weight_bits":  # a change in group 0 that drops its corrections at the next step
        opt.param_groups[0]["master_weight_bits"] = None
    good = params[2].grad
    params[2].grad = good.to_sparse()
    before = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"^parameter group 1 index 0 has a sparse gradient; dist8 needs dense gradients$"):
        opt.step()
    assert same(before, snapshot(opt, params)), "the refused step changed the optimizer or the parameters"
    if case == "master_weight_bits":
        opt.param_groups[0]["master_weight_bits"] = 24  # the user takes the change back
    params[2].grad = good
    for k in range(start, 4):
        if k > start:
            give_grads(params, k)
        opt.step()
    assert same(snapshot(opt, params), clean_run(4, **kw))


def test_a_load_whose_warning_is_an_error_is_whole():
    """Under ``-W error`` (pytest's filterwarnings=error) the state-kind warning used to be raised in the
    middle of the load, after group 0's values were replaced and before the state was."""
    params, opt = build()
    gen = torch.Generator().manual_seed(1)
    others = [torch.nn.Parameter(torch.randn(p.shape, generator=gen)) for p in params]
    saver = dist8.AdamW8bit([{"params": others[:2], "lr": 5e-4},
                             {"params": others[2:], "lr": 2e-3, "optim_bits": 32}], min_8bit_size=0)
    for k in range(2):
        give_grads(others, k)
        saver.step()
    give_grads(params, 0)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"optim_bits=32 \(this optimizer: 8\)"):
            opt.load_state_dict(saver.state_dict())
    assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[1]["optim_bits"] == 32
    assert opt.state[params[0]]["step"] == 2  # the state came too


def test_checkpoint_load_drops_the_state_of_a_parameter_the_checkpoint_has_none_for(tmp_path):
    """As ``load_state_dict`` does: a parameter that never got a gradient in the saved run has no state
    in the checkpoint, and the loading optimizer's own (from another run) must not survive beside it."""
    def model_and_opt():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        return model, dist8.AdamW8bit(model.named_parameters(), min_8bit_size=0)

    def train(model, opt, steps, freeze_last_bias=False):
        for _ in range(steps):
            model(torch.randn(4, 64)).pow(2).sum().backward()
            if freeze_last_bias:
                model[1].bias.grad = None
            opt.step()
            opt.zero_grad()

    saved_model, saved_opt = model_and_opt()
    train(saved_model, saved_opt, 2, freeze_last_bias=True)
    dist8.checkpoint.save(tmp_path / "ckpt", saved_model, saved_opt, step=2)
    model, opt = model_and_opt()
    train(model, opt, 3)
    dist8.checkpoint.load(tmp_path / "ckpt", model, opt)
    assert not opt.state.get(model[1].bias), "the parameter kept state from the loading optimizer's own run"
    assert opt.state[model[0].weight]["step"] == 2
    reference, ref_opt = model_and_opt()
    reference.load_state_dict(saved_model.state_dict())
    ref_opt.load_state_dict(saved_opt.state_dict())
    torch.manual_seed(5)
    train(model, opt, 2)
    torch.manual_seed(5)
    train(reference, ref_opt, 2)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_override_config_after_the_first_step_applies_as_in_bitsandbytes():
    """bitsandbytes reads GlobalOptimManager's settings at every step; dist8 read them once, so an
    ``override_config(p, "lr", 0.0)`` made after the first step left the parameter moving."""
    mng = GlobalOptimManager.get_instance()
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 32)
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
        mng.override_config(model.weight, "lr", 0.0)
        frozen, bias = model.weight.detach().clone(), model.bias.detach().clone()
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 32)).sum().backward()
            opt.step()
        assert torch.equal(model.weight, frozen)
        assert not torch.equal(model.bias, bias)
        mng.override_config(model.weight, "lr", -1.0)
        model(torch.randn(4, 32)).sum().backward()
        before = model.weight.detach().clone()
        with pytest.raises(ValueError, match="lr"):
            opt.step()
        assert torch.equal(model.weight, before)
    finally:
        mng.initialize()


@pytest.mark.parametrize("how", ["override_config", "param_group"])
def test_percentile_clipping_turned_on_after_the_first_step_is_refused_naming_the_parameter(how):
    """The gradient-norm history starts with the state. Turned on later, the step read a history that was
    not there (KeyError 'gnorm_vec', as in bitsandbytes); filled with zeros instead, its low percentiles
    would scale every gradient to 0. Refused like any other state-kind change; turned off, nothing breaks."""
    mng = GlobalOptimManager.get_instance()
    try:
        params, opt = build()
        give_grads(params, 0)
        opt.step()
        if how == "override_config":
            mng.override_config(params[2], "percentile_clipping", 5)
        else:
            opt.param_groups[1]["percentile_clipping"] = 5
        give_grads(params, 1)
        before = snapshot(opt, params)
        with pytest.raises(ValueError, match=r"^parameter group 1 index 0 has percentile_clipping=5 but its state "
                                             r"has no gradient-norm history \(clipping turned on after its first "
                                             r"step\?\); give it fresh state with del optimizer.state\[param\]$"):
            opt.step()
        assert same(before, snapshot(opt, params)), "the refused step changed the optimizer or the parameters"
        for p in params[2:] if how == "param_group" else params[2:3]:
            del opt.state[p]
        opt.step()  # fresh state: the history starts now
        assert "gnorm_vec" in opt.state[params[2]] and "gnorm_vec" not in opt.state[params[0]]
    finally:
        mng.initialize()


def test_percentile_clipping_turned_off_after_the_first_step_steps_on():
    params, opt = build(percentile_clipping=5)
    give_grads(params, 0)
    opt.step()
    opt.param_groups[0]["percentile_clipping"] = 100
    give_grads(params, 1)
    before = params[0].detach().clone()
    opt.step()
    assert not torch.equal(params[0], before) and opt.state[params[0]]["step"] == 2


def test_copies_of_an_optimizer_whose_step_a_scheduler_wrapped_step_themselves():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = dist8.AdamW8bit([p], lr=1e-2, min_8bit_size=0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    scheduler.step()
    for twin in (copy.deepcopy(opt), torch.load(_saved(opt), weights_only=False)):
        q = twin.param_groups[0]["params"][0]
        q.grad, p.grad = torch.ones_like(q), None
        before, original = q.detach().clone(), p.detach().clone()
        twin.step()
        assert not torch.equal(q, before), "the copy's step did not move the copy's parameter"
        assert torch.equal(p, original) and opt.state[p]["step"] == 1, "the copy's step stepped the original"
        assert twin.state[q]["step"] == 2


def _saved(opt) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(opt, buf)  # failed (PicklingError on the wrapped step) before
    buf.seek(0)
    return buf


def test_a_copy_of_an_optimizer_under_gradient_release_is_a_plain_optimizer():
    model = torch.nn.Linear(16, 16)
    opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
    handle = dist8.gradient_release(model, opt)
    try:
        twin = copy.deepcopy(opt)  # TypeError: cannot pickle '_thread.lock' object, before
        assert "step" not in twin.__dict__ and "zero_grad" not in twin.__dict__
    finally:
        handle.remove()
