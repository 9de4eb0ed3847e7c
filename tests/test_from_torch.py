"""dist8.checkpoint.from_torch_optim: a torch.optim run continues with a dist8 optimizer.

* every torch optimizer with a dist8 counterpart (Adam, AdamW, SGD with momentum, RMSprop with
  and without momentum, Adagrad): converted into the dist8 optimizer with 32-bit state, the run
  continues as torch's does (to float rounding: the same numbers went in); with 8-bit state, each
  state value is its nearest code (the map value nearest to torch's value over the block's absmax) and the
  continuation stays close to torch's;
* torch's param-group values (lr, betas, ...) and ``initial_lr`` come along; a full state dict
  keyed by parameter names (torch.distributed.checkpoint's) converts by name;
* dist8 -> torch layout (``export_fp32_adam``) -> dist8 is bitwise for 32-bit state; lion-pytorch's
  layout (``exp_avg``, no step) continues bitwise;
* what does not fit is refused with one line naming the parameter and key, before anything loads.
"""
import copy

import pytest
import torch

import dist8
from dist8.checkpoint import CheckpointError, from_torch_optim
from dist8.checkpoint.convert import export_fp32_adam

PAIRS = {
    "AdamW": (torch.optim.AdamW, dist8.AdamW8bit, dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)),
    "Adam": (torch.optim.Adam, dist8.Adam8bit, dict(lr=1e-2, weight_decay=0.01)),
    "SGD": (torch.optim.SGD, dist8.SGD8bit, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
    "RMSprop": (torch.optim.RMSprop, dist8.RMSprop8bit, dict(lr=1e-3, alpha=0.9)),
    "RMSprop-momentum": (torch.optim.RMSprop, dist8.RMSprop8bit, dict(lr=1e-3, momentum=0.9)),
    "Adagrad": (torch.optim.Adagrad, dist8.Adagrad8bit, dict(lr=1e-2, lr_decay=1e-3)),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def train(model, opt, start, stop):
    for i in range(start, stop):
        x = torch.randn(16, 96, generator=torch.Generator().manual_seed(i))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def torch_run(name, steps=4):
    tcls, _, kw = PAIRS[name]
    model = make_model()
    opt = tcls(model.parameters(), **kw)
    train(model, opt, 0, steps)
    return model, opt


@pytest.mark.parametrize("name", list(PAIRS))
def test_32bit_continuation_follows_torch(name):
    model, topt = torch_run(name)
    ours = copy.deepcopy(model)
    _, dcls, kw = PAIRS[name]
    opt = dcls(ours.parameters(), **dict(kw, lr=123.0), optim_bits=32)  # torch's lr comes along
    opt.load_state_dict(from_torch_optim(topt.state_dict(), opt))
    assert opt.param_groups[0]["lr"] == kw["lr"]
    train(model, topt, 4, 8)
    train(ours, opt, 4, 8)
    for a, b in zip(ours.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop-momentum"])
def test_8bit_state_is_the_nearest_code_and_the_run_stays_close(name):
    model, topt = torch_run(name)
    ours = copy.deepcopy(model)
    _, dcls, kw = PAIRS[name]
    opt = dcls(ours.parameters(), **kw, min_8bit_size=1000)  # the weights 8-bit, the biases 32-bit
    converted = from_torch_optim(topt.state_dict(), opt)
    opt.load_state_dict(converted)
    w = ours[0].weight
    assert opt.state[w]["state1"].dtype == torch.uint8 and opt.state[ours[0].bias]["state1"].dtype == torch.float32
    tstate = topt.state[model[0].weight]
    first = "exp_avg" if name == "AdamW" else "momentum_buffer" if name == "SGD" else "square_avg"
    if name == "AdamW":
        back = export_fp32_adam(opt.state_dict())["state"][0]["exp_avg"]
    else:
        from dist8.quant import dequantize_blockwise
        back = dequantize_blockwise(opt.state[w]["state1"], opt.state[w]["absmax1"],
                                    opt.qmap(torch.device("cpu"), opt.rule_state_signed(1)))
    absmax = opt.state[w]["absmax1"].repeat_interleave(256)[: w.numel()].view(w.shape)
    assert torch.equal(absmax.amax(), tstate[first].abs().amax())  # absmax: the block's largest magnitude
    # each value sits at the map value nearest to it (the map's own rounding, nothing more)
    qmap = opt.qmap(torch.device("cpu"), opt.rule_state_signed(1))
    nearest = ((tstate[first] / absmax)[..., None] - qmap).abs().amin(-1) * absmax
    assert ((back - tstate[first]).abs() <= nearest + 1e-6 * absmax).all()
    train(model, topt, 4, 8)
    train(ours, opt, 4, 8)
    for a, b in zip(ours.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)


def test_full_state_dict_keyed_by_names_and_initial_lr():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, topt = torch_run("AdamW")
    torch.optim.lr_scheduler.StepLR(topt, step_size=2)  # writes initial_lr into torch's groups
    full = get_optimizer_state_dict(model, topt)
    assert isinstance(next(iter(full["state"])), str)  # keyed by parameter name
    opt = dist8.AdamW8bit(model.named_parameters(), min_8bit_size=1000)
    opt.load_state_dict(from_torch_optim(full, opt))
    assert opt.param_groups[0]["initial_lr"] == 1e-2 and opt.state[model[0].weight]["step"] == 4
    # listed by name in another order: each state still lands on its own parameter
    shuffled = copy.deepcopy(full)
    shuffled["param_groups"][0]["params"] = list(reversed(shuffled["param_groups"][0]["params"]))
    again = dist8.AdamW8bit(model.named_parameters(), min_8bit_size=1000)
    again.load_state_dict(from_torch_optim(shuffled, again))
    for p in model.parameters():
        assert all(torch.equal(again.state[p][k], v) if torch.is_tensor(v) else again.state[p][k] == v
                   for k, v in opt.state[p].items())
    two_groups = dist8.AdamW8bit([{"params": [("0.weight", model[0].weight)]},
                                  {"params": [(n, p) for n, p in model.named_parameters() if n != "0.weight"]}])
    split = copy.deepcopy(full)
    split["param_groups"] = [dict(split["param_groups"][0], params=["0.bias"]),
                             dict(split["param_groups"][0], params=["0.weight", "2.weight", "2.bias"])]
    with pytest.raises(CheckpointError, match=r"^param group 0: the torch state dict lists parameter '0.bias' there, "
                                              r"the optimizer in another group"):
        from_torch_optim(split, two_groups)
    unnamed = dist8.AdamW8bit(model.parameters())
    with pytest.raises(CheckpointError, match=r"names parameter '0.weight', which the optimizer does not have "
                                              r"\(build it from model.named_parameters\(\)"):
        from_torch_optim(full, unnamed)


def _mutated(sd, change):
    sd = copy.deepcopy(sd)
    change(sd)
    return sd


def test_what_does_not_fit_is_refused_naming_parameter_and_key():
    model, topt = torch_run("AdamW")
    sd = topt.state_dict()
    opt = dist8.AdamW8bit(model.named_parameters(), min_8bit_size=1000)
    before = copy.deepcopy(opt.state_dict())
    cases = [
        (lambda d: d["state"][0].update(max_exp_avg_sq=d["state"][0]["exp_avg_sq"]),
         r"^state of parameter 0.weight has 'max_exp_avg_sq' \(amsgrad=True\)"),
        (lambda d: d["state"][0].pop("exp_avg_sq"), r"^state of parameter 0.weight has no tensor 'exp_avg_sq'"),
        (lambda d: d["state"][2].update(exp_avg=torch.zeros(3)), r"^exp_avg of parameter 2.weight is torch.float32 \(3,\)"),
        (lambda d: d["state"][1]["exp_avg"].__setitem__(0, float("nan")), r"^exp_avg of parameter 0.bias holds inf or NaN"),
        (lambda d: d["state"][1]["exp_avg_sq"].__setitem__(0, -1.0), r"^exp_avg_sq of parameter 0.bias has negative"),
        (lambda d: d["state"][0].update(step=torch.tensor(2.5)), r"^step of parameter 0.weight must be a whole number"),
        (lambda d: d["param_groups"].append({"params": []}), r"^the torch state dict has 2 param groups, the optimizer 1"),
        (lambda d: d["state"].update({0: {1: 2, "step": 1}}), r"^state of parameter 0.weight has no tensor 'exp_avg' "
                                                              r"\(keys: \['1', 'step'\]\)"),
        (lambda d: d["state"][0].update(step=[1] * 10**4),
            r"^step of parameter 0.weight must be a whole number in \[0, 2\*\*62\], "
            r"got \[1, 1, .{,60}\.\.\.$"),
        (lambda d: d["param_groups"][0]["params"].pop(), r"^param group 0: the torch state dict lists 3 parameters, "
                                                         r"the optimizer 4"),
        # "Cannot copy out of meta tensor", "Tensor.item() cannot be called on meta tensors": naming nothing
        (lambda d: d["state"][1].update(exp_avg=torch.empty_like(d["state"][1]["exp_avg"], device="meta")),
         r"^exp_avg of parameter 0.bias is not a plain dense tensor with values \(a DTensor, sparse, nested or on "),
        (lambda d: d["state"][1].update(step=torch.empty((), device="meta")),
         r"^step of parameter 0.bias must be a whole number in \[0, 2\*\*62\], got a tensor without values \(meta\)"),
    ]
    for change, match in cases:
        with pytest.raises(CheckpointError, match=match) as info:
            from_torch_optim(_mutated(sd, change), opt)
        assert "\n" not in str(info.value)
    bad_base = from_torch_optim(_mutated(sd, lambda d: d["param_groups"][0].update(initial_lr="abc")), opt)
    with pytest.raises(ValueError, match=r"^initial_lr must be a finite number \(param group 0 of the loaded state "
                                         r"dict\), got 'abc'$"):
        opt.load_state_dict(bad_base)  # an LR scheduler's base, which scales every later lr
    bad_lr = from_torch_optim(_mutated(sd, lambda d: d["param_groups"][0].update(lr=float("nan"))), opt)
    with pytest.raises(ValueError, match=r"^lr must be a finite number \(param group 0 of the loaded state dict\)"):
        opt.load_state_dict(bad_lr)  # torch's group values go through the optimizer's own checks
    assert opt.state_dict()["param_groups"] == before["param_groups"] and not opt.state
    with pytest.raises(CheckpointError, match=r"^state of parameter 0.weight has 'exp_avg', which SGD8bit does not "
                                              r"continue from \(it continues from \['momentum_buffer'\]\): another"):
        from_torch_optim(sd, dist8.SGD8bit(model.named_parameters(), lr=1e-2, momentum=0.9))
    rms = torch.optim.RMSprop(model.parameters(), momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    rms.step()
    with pytest.raises(CheckpointError, match=r"has 'momentum_buffer', which RMSprop8bit does not continue from .*"
                                              r"continues in an RMSprop built with momentum > 0$"):
        from_torch_optim(rms.state_dict(), dist8.RMSprop8bit(model.named_parameters()))
    # lion-pytorch's state is exp_avg too, but torch AdamW's also holds exp_avg_sq: not taken for Lion's
    with pytest.raises(CheckpointError, match=r"^state of parameter 0.weight has 'exp_avg_sq', which Lion8bit does not"):
        from_torch_optim(sd, dist8.Lion8bit(model.named_parameters()))
    with pytest.raises(CheckpointError, match=r"LAMB8bit \(LAMB\) has no torch.optim counterpart"):
        from_torch_optim(sd, dist8.LAMB8bit(model.parameters()))
    with pytest.raises(TypeError, match="not ShardedOptimizer"):
        from_torch_optim(sd, dist8.ShardedOptimizer(model.parameters(), dist8.AdamW8bit))


def test_load_state_dict_of_a_torch_state_dict_names_the_converter():
    model, topt = torch_run("AdamW")
    opt = dist8.AdamW8bit(model.parameters())
    with pytest.raises(KeyError, match=r"a torch.optim state dict; convert it with "
                                       r"dist8.checkpoint.from_torch_optim\(state_dict, optimizer\)"):
        opt.load_state_dict(topt.state_dict())


def assert_continues_bitwise(model, opt, twin, again):
    """Three more steps of (model, opt) and of its converted twin (twin, again) end bitwise equal."""
    train(model, opt, 3, 6)
    train(twin, again, 3, 6)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_32bit_round_trip_through_torch_layout_is_bitwise():
    # dist8 -> torch AdamW layout (export_fp32_adam) -> dist8 (from_torch_optim): 32-bit state is
    # copied, so the run continues bitwise as if never converted.
    model = make_model()
    opt = dist8.AdamW32bit(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, 0, 3)
    twin = copy.deepcopy(model)
    again = dist8.AdamW32bit(twin.parameters(), lr=1.0)
    again.load_state_dict(from_torch_optim(export_fp32_adam(opt.state_dict()), again))
    assert_continues_bitwise(model, opt, twin, again)


def test_lion_pytorch_layout():
    # lion-pytorch keeps {"exp_avg"} per parameter and no step; its groups: lr, betas, weight_decay.
    model = make_model()
    opt = dist8.Lion32bit(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    train(model, opt, 0, 3)
    ids = list(range(len(list(model.parameters()))))
    lion_pytorch_sd = {"state": {i: {"exp_avg": opt.state[p]["state1"].clone()}
                                 for i, p in zip(ids, model.parameters())},
                       "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1, "params": ids}]}
    twin = copy.deepcopy(model)
    again = dist8.Lion32bit(twin.parameters(), lr=1.0)
    again.load_state_dict(from_torch_optim(lion_pytorch_sd, again))
    assert again.state[twin[0].weight]["step"] == 1 and again.param_groups[0]["betas"] == (0.9, 0.99)
    assert_continues_bitwise(model, opt, twin, again)


def test_maximize_travels_both_ways():
    # a maximizing dist8 run exported to torch's layout keeps maximize=True, and comes back with it
    model = make_model()
    opt = dist8.AdamW32bit(model.parameters(), lr=1e-2, maximize=True)
    train(model, opt, 0, 2)
    exported = export_fp32_adam(opt.state_dict())
    assert exported["param_groups"][0]["maximize"] is True
    theirs = copy.deepcopy(model)
    torch_opt = torch.optim.AdamW(theirs.parameters())
    torch_opt.load_state_dict(exported)
    assert torch_opt.param_groups[0]["maximize"] is True
    again = dist8.AdamW32bit(copy.deepcopy(model).parameters())
    again.load_state_dict(from_torch_optim(torch_opt.state_dict(), again))
    assert again.param_groups[0]["maximize"] is True


def test_state_of_another_weight_decay_or_nadam_is_refused():
    """torch's Adam (L2 decay) continued silently in dist8's AdamW (decoupled), and AdamW's in Adam; NAdam's
    state (its mu_product dropped) in AdamW8bit (outside probe). Without weight decay Adam and AdamW agree."""
    for tcls, dcls, theirs in [(torch.optim.Adam, dist8.AdamW32bit, "as L2 \\(Adam\\)"),
                               (torch.optim.AdamW, dist8.Adam32bit, "decoupled \\(AdamW\\)")]:
        model = make_model()
        topt = tcls(model.parameters(), lr=1e-2, weight_decay=0.5)
        train(model, topt, 0, 2)
        with pytest.raises(CheckpointError, match=rf"^param group 0: the torch optimizer decays weights {theirs} "
                                                  r"\(decoupled_weight_decay=(True|False)\), "):
            from_torch_optim(topt.state_dict(), dcls(model.parameters()))
        plain = tcls(model.parameters(), lr=1e-2, weight_decay=0.0)
        train(model, plain, 0, 1)
        from_torch_optim(plain.state_dict(), dcls(model.parameters()))  # no decay: the same update
    model = make_model()
    nadam = torch.optim.NAdam(model.parameters(), lr=1e-2)
    train(model, nadam, 0, 2)
    with pytest.raises(CheckpointError, match=r"has 'mu_product' \(NAdam's momentum schedule\)"):
        from_torch_optim(nadam.state_dict(), dist8.AdamW8bit(model.parameters()))
