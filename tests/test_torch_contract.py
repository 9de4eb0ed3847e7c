"""torch.optim's generic optimizer contract, held over every dist8 optimizer in 8 and 32 bits.

The checks follow the shape of torch's own ``test/optim/test_optim.py`` and
``torch.testing._internal.common_optimizers`` (what any code written for
``torch.optim.Optimizer`` may rely on), with dist8's stronger expectation where it
has one: results are compared *bitwise* against a plain run, not within a tolerance.

* state_dict round trip (also through ``torch.save``/``torch.load(weights_only=True)``)
  continues bitwise; ``copy.deepcopy`` and ``pickle`` give an optimizer that steps
  identically and keeps every public attribute;
* ``register_load_state_dict_pre_hook``/``post_hook`` (and the state-dict hooks) run;
* non-contiguous parameters and gradients (torch's ``contiguous=False`` cases, a
  gradient assigned as ``g.t()``) step bitwise as their contiguous copies do;
* ``meta`` tensors step; empty (numel 0) parameters step with ``min_8bit_size=0``;
* learning-rate schedulers incl. ``OneCycleLR`` (which cycles ``momentum``/``betas``),
  closures, ``add_param_group``, ``zero_grad(set_to_none=True|False)``.
"""
import copy
import io
import pickle

import pytest
import torch

import dist8
import dist8.optim as O

# name: (8-bit class, kwargs). Each runs with optim_bits=8 and =32; min_8bit_size=0 so the
# small test tensors really get 8-bit state.
OPTIMIZERS = {
    "Adam": (O.Adam8bit, dict(lr=1e-2, weight_decay=0.01)),
    "AdamW": (O.AdamW8bit, dict(lr=1e-2, weight_decay=0.1)),
    "SGD": (O.SGD8bit, dict(lr=1e-2, momentum=0.9)),
    "RMSprop": (O.RMSprop8bit, dict(lr=1e-3)),
    "Adagrad": (O.Adagrad8bit, dict(lr=1e-2)),
    "Lion": (O.Lion8bit, dict(lr=1e-3, weight_decay=0.1)),
    "LAMB": (O.LAMB8bit, dict(lr=1e-2, weight_decay=0.01)),
    "LARS": (O.LARS8bit, dict(lr=1e-1, momentum=0.9)),
    "AdEMAMix": (O.AdEMAMix8bit, dict(lr=1e-3, t_alpha=5, t_beta3=5)),
}
CASES = [(name, bits) for name in OPTIMIZERS for bits in (8, 32)]
IDS = [f"{name}-{bits}bit" for name, bits in CASES]
# torch counterparts, where one exists: a scheduler that refuses one refuses the other.
TORCH_CLASS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD,
               "RMSprop": torch.optim.RMSprop, "Adagrad": torch.optim.Adagrad}

cases = pytest.mark.parametrize("name,bits", CASES, ids=IDS)


def make(name, bits, params, **extra):
    cls, kw = OPTIMIZERS[name]
    return cls(params, **dict(kw, optim_bits=bits, min_8bit_size=0, **extra))


def make_params(seed=0, shapes=((40, 30), (30,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def run(opt, params, steps, start=0):
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()


def assert_same(params_a, params_b, opt_a, opt_b):
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa.detach(), pb.detach())
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ---- state dict, copies ------------------------------------------------------------------------
@cases
def test_state_dict_round_trip_through_torch_save(name, bits):
    params = make_params()
    opt = make(name, bits, params)
    run(opt, params, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    params2 = clone_params(params)
    opt2 = make(name, bits, params2, lr=123.0)  # the loaded param_groups win
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    run(opt, params, 2, start=3)
    run(opt2, params2, 2, start=3)
    assert_same(params, params2, opt, opt2)


@cases
def test_stepping_after_a_load_leaves_the_loaded_state_dict_alone(name, bits):
    """An in-memory snapshot (``copy.deepcopy(opt.state_dict())``) loads, the run goes on, and the
    snapshot loads again unchanged: loaded state never shares memory with the dict it came from
    (as bitsandbytes; torch's own optimizers alias it)."""
    params = make_params()
    opt = make(name, bits, params)
    run(opt, params, 3)
    snapshot = copy.deepcopy(opt.state_dict())
    kept = copy.deepcopy(snapshot)
    opt.load_state_dict(snapshot)
    run(opt, params, 2, start=3)
    for key, st in kept["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(snapshot["state"][key][k], v), (key, k)


@cases
@pytest.mark.parametrize("named_from,named_to", [(True, True), (True, False), (False, True), (False, False)])
def test_param_names_in_state_dict_and_loads_across_named_and_unnamed(name, bits, named_from, named_to):
    """torch's ``test_can_load_from_to_named_state_dict``: an optimizer given named parameters lists
    them under ``param_groups[i]["param_names"]`` (and its state dict does); a state dict loads into
    an optimizer built either way, the loaded names win, and the run continues bitwise."""
    names = ["w", "b"]
    params = make_params()
    opt = make(name, bits, list(zip(names, params)) if named_from else params)
    run(opt, params, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0].get("param_names") == (names if named_from else None)
    params2 = clone_params(params)
    opt2 = make(name, bits, list(zip(names, params2)) if named_to else params2)
    opt2.load_state_dict(sd)
    run(opt, params, 2, start=3)
    run(opt2, params2, 2, start=3)
    assert_same(params, params2, opt, opt2)
    assert opt2.state_dict()["param_groups"][0].get("param_names") == (names if named_from or named_to else None)


def test_param_names_mixed_with_unnamed_parameters_are_listed_by_position():
    """torch.optim refuses named next to unnamed parameters; dist8 always took them (names are for
    ``overrides``), so an unnamed one is listed in ``param_names`` by its position, and an
    ``add_param_group`` that refuses a group takes back every name it gave."""
    a, b, c, d = make_params(shapes=((40, 30), (30,), (7,), (5,)))
    opt = dist8.AdamW8bit([("a", a), b])
    assert opt.param_groups[0]["param_names"] == ["a", "group 0 index 1"] and opt.param_name(b) == "group 0 index 1"
    opt = dist8.AdamW8bit([{"params": [a]}, {"params": [("b", b)], "lr": 1e-4}], overrides={"b": {"lr": 0.5}})
    assert [g["param_names"] for g in opt.param_groups] == [["group 0 index 0"], ["b"]]
    assert opt.settings(b, opt.param_groups[1]).hyper["lr"] == 0.5 and opt.settings(a, opt.param_groups[0]).hyper["lr"] == 1e-3
    # torch's own spelling: a group that carries param_names; a list that does not fit is no names
    opt = dist8.AdamW8bit([{"params": [a, b], "param_names": ["a", "b"]}], overrides={"b": {"lr": 0.5}})
    assert opt.param_name(b) == "b" and opt.state_dict()["param_groups"][0]["param_names"] == ["a", "b"]
    stale = dist8.AdamW8bit([{"params": [a, b], "param_names": ["a", "b", "x"]}])  # a repartitioned copy
    assert "param_names" not in stale.param_groups[0] and stale.param_name(a) == "group 0 index 0"
    # an unnamed optimizer gets a named group: the earlier groups are listed by position
    opt = dist8.AdamW8bit([a, b])
    with pytest.raises(ValueError, match=r"^lr must be a finite number \(param group 1\)"):
        opt.add_param_group({"params": [("c", c)], "lr": float("nan")})
    assert len(opt.param_groups) == 1 and "param_names" not in opt.param_groups[0] and c not in opt.param_names
    opt.add_param_group({"params": [("c", c)], "lr": 1e-4})
    opt.add_param_group({"params": [d]})
    assert [g["param_names"] for g in opt.param_groups] == [["group 0 index 0", "group 0 index 1"], ["c"],
                                                           ["group 2 index 0"]]
    assert opt.param_name(c) == "c"
    # a loaded state dict's names replace the groups' only where they fit
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["param_names"] = ["x", "y"]
    sd["param_groups"][1]["param_names"] = "c"
    opt.load_state_dict(sd)
    assert [g["param_names"] for g in opt.param_groups] == [["x", "y"], ["c"], ["group 2 index 0"]]


@cases
def test_maximize_is_the_minimizing_step_on_the_negated_gradient(name, bits):
    """torch.optim's ``maximize=True``: bitwise the step on ``-grad`` (every backend folds the sign
    into the gradient scale), and for optimizers torch has, torch's own result in 32 bits."""
    params, negated = make_params(), make_params()
    opt = make(name, bits, params, maximize=True)
    ref = make(name, bits, negated)
    assert opt.param_groups[0]["maximize"] is True and ref.param_groups[0]["maximize"] is False
    for s in range(4):
        set_grads(params, s)
        for p, q in zip(params, negated):
            q.grad = -p.grad
        opt.step()
        ref.step()
    assert_same(params, negated, opt, ref)
    if bits == 32 and name in TORCH_CLASS:
        cls, kw = OPTIMIZERS[name]
        theirs = make_params()
        torch_opt = TORCH_CLASS[name](theirs, maximize=True, **kw)
        ours = make_params()
        opt = make(name, bits, ours, maximize=True)
        for s in range(4):
            set_grads(ours, s)
            set_grads(theirs, s)
            opt.step()
            torch_opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^maximize must be True or False, got 'yes'"):
        make(name, bits, make_params(), maximize="yes")


PUBLIC_ATTRS = ("block_size", "block_wise", "quant_map", "overrides", "on_nonfinite", "check_finite",
                "nonfinite_skips", "amp_skips", "last_nonfinite", "defaults")


@cases
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_steps_identically_and_keeps_public_attributes(name, bits, how):
    params = make_params()
    opt = make(name, bits, [("w", params[0]), ("b", params[1])], overrides={"b": {"lr": 1e-4}})
    run(opt, params, 2)
    opt.nonfinite_skips = 3  # a counter with history must travel too
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2.param_groups[0]["params"][0] is params2[0]
    for attr in PUBLIC_ATTRS:
        assert getattr(opt2, attr) == getattr(opt, attr), attr
    assert opt2.param_name(params2[1]) == "b"
    run(opt, params, 2, start=2)
    run(opt2, params2, 2, start=2)
    assert_same(params, params2, opt, opt2)
    # the copy is independent: stepping it does not move the original
    before = params[0].detach().clone()
    run(opt2, params2, 1, start=4)
    assert torch.equal(params[0].detach(), before)


@cases
def test_load_state_dict_and_state_dict_hooks_run(name, bits):
    params = make_params()
    opt = make(name, bits, params)
    run(opt, params, 1)
    calls = []

    def sd_pre(o):
        calls.append("sd_pre")

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_pre_hook(sd_pre)
    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls == ["sd_pre", "sd_post"]

    params2 = clone_params(params)
    opt2 = make(name, bits, params2)
    lrs = []

    def load_pre(o, state_dict):
        assert o is opt2
        calls.append("load_pre")
        state_dict = dict(state_dict)
        state_dict.pop("extra")
        state_dict["param_groups"] = [dict(g, lr=0.5) for g in state_dict["param_groups"]]
        return state_dict

    def load_post(o):
        assert o is opt2
        calls.append("load_post")
        lrs.append(o.param_groups[0]["lr"])  # read after the load

    h1 = opt2.register_load_state_dict_pre_hook(load_pre)
    opt2.register_load_state_dict_post_hook(load_post)
    opt2.load_state_dict(sd)
    assert calls[2:] == ["load_pre", "load_post"] and lrs == [0.5]  # the pre hook's change was loaded
    assert opt2.state[params2[0]]["step"] == 1
    h1.remove()
    opt2.load_state_dict(opt.state_dict())  # 'extra' is ignored when no hook strips it
    assert calls[-1] == "load_post" and lrs[-1] == opt.param_groups[0]["lr"]


def test_sharded_optimizer_runs_load_state_dict_hooks():
    params = make_params()
    opt = dist8.ShardedOptimizer([("w", params[0]), ("b", params[1])], dist8.AdamW8bit, min_8bit_size=0)
    calls = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post"]


# ---- tensors of every kind -----------------------------------------------------------------------
def _noncontiguous(t):
    """A non-contiguous tensor with the values of ``t`` (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
    wide[..., 0] = t
    out = wide[..., 0]
    assert not out.is_contiguous()
    return out


@cases
@pytest.mark.parametrize("which", ["param", "grad", "both", "grad-transposed"])
def test_noncontiguous_params_and_grads_step_as_contiguous(name, bits, which):
    ref_params = make_params(shapes=((40, 30), (30,), (4, 5, 6)))
    params = [torch.nn.Parameter(_noncontiguous(p.detach()) if which in ("param", "both") else p.detach().clone())
              for p in ref_params]
    ref = make(name, bits, ref_params)
    opt = make(name, bits, params)
    for s in range(3):
        set_grads(ref_params, s)
        for p, q in zip(params, ref_params):
            g = q.grad.clone()
            if which in ("grad", "both"):
                g = _noncontiguous(g)
            elif which == "grad-transposed" and g.dim() == 2:
                g = g.t().contiguous().t()  # a grad assigned as h.t(): strides (1, rows)
                assert not g.is_contiguous()
            p.grad = g
        ref.step()
        strides = [p.stride() for p in params]
        opt.step()
        assert [p.stride() for p in params] == strides  # updated in place, layout kept
    for p, q in zip(params, ref_params):
        assert torch.equal(p.detach(), q.detach())
        for k, v in ref.state[q].items():
            got = opt.state[p][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v, k


@cases
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(name, bits, contiguous):
    """torch's test_forloop_goes_right_direction: a few steps lower a quadratic loss."""
    torch.manual_seed(0)
    weight = torch.randn(10, 5, 2)[..., 0] if not contiguous else torch.randn(10, 5)
    weight = torch.nn.Parameter(weight)
    bias = torch.nn.Parameter(torch.randn(10))
    inp = torch.randn(5)
    opt = make(name, bits, [weight, bias], lr=1e-2 if name != "LARS" else 1e-1)

    def closure():
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(5):
        opt.step(closure)
    assert closure().item() < initial


@cases
def test_meta_tensors_step(name, bits):
    params = [torch.nn.Parameter(torch.empty(40, 30, device="meta")), torch.nn.Parameter(torch.empty(30, device="meta"))]
    opt = make(name, bits, params)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    assert all(p.device.type == "meta" for p in params)
    st = opt.state[params[0]]
    assert st["step"] == 2 and st["state1"].device.type == "meta"
    assert st["state1"].dtype == (torch.uint8 if bits == 8 else torch.float32)


@cases
def test_empty_parameter_steps_with_min_8bit_size_0(name, bits):
    params = [torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0, 7)), *make_params()]
    ref_params = clone_params(params[2:])
    opt = make(name, bits, params)
    ref = make(name, bits, ref_params)
    for s in range(2):
        set_grads(params, s)
        set_grads(ref_params, s)
        opt.step()
        ref.step()
    assert params[0].numel() == 0 and opt.state[params[0]]["step"] == 2
    assert_same(params[2:], ref_params, opt, ref)
    opt2 = make(name, bits, clone_params(params))
    opt2.load_state_dict(opt.state_dict())


# ---- schedulers, closures, groups, zero_grad -------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=2),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
}


@cases
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_schedulers_drive_the_optimizer(name, bits, sched):
    params = make_params()
    opt = make(name, bits, params)
    if sched in ("OneCycleLR", "CyclicLR") and name == "Adagrad":
        # torch.optim.Adagrad has neither momentum nor betas: both refuse it the same way
        with pytest.raises(ValueError, match="momentum"):
            SCHEDULERS[sched](torch.optim.Adagrad(clone_params(params)))
        with pytest.raises(ValueError, match="momentum"):
            SCHEDULERS[sched](opt)
        return
    if sched in ("OneCycleLR", "CyclicLR") and name == "RMSprop":
        # RMSprop exposes `momentum` as torch's does, but has no momentum buffer (see
        # test_rmsprop_refuses_cycled_momentum_before_changing_anything): cycle the lr only
        scheduler = _without_momentum(sched, opt)
    else:
        scheduler = SCHEDULERS[sched](opt)
    lrs = []
    for s in range(6):
        set_grads(params, s)
        opt.step()
        scheduler.step(1.0) if sched == "ReduceLROnPlateau" else scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1  # the schedule reached the optimizer
    assert all(torch.isfinite(p).all() for p in params)
    if name in TORCH_CLASS:  # the same schedule as on torch's optimizer
        topt = TORCH_CLASS[name](clone_params(params), **OPTIMIZERS[name][1])
        tsched = _without_momentum(sched, topt) if sched in ("OneCycleLR", "CyclicLR") and name == "RMSprop" \
            else SCHEDULERS[sched](topt)
        tlrs = []
        for _ in range(6):
            topt.step()
            tsched.step(1.0) if sched == "ReduceLROnPlateau" else tsched.step()
            tlrs.append(topt.param_groups[0]["lr"])
        assert lrs == pytest.approx(tlrs)
    sd = opt.state_dict()  # the scheduler's extra keys (initial_lr, max_momentum, ...) round-trip
    opt2 = make(name, bits, clone_params(params))
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _without_momentum(sched, opt):
    if sched == "OneCycleLR":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=False)
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=2, cycle_momentum=False)


@pytest.mark.parametrize("bits", [8, 32])
def test_rmsprop_refuses_cycled_momentum_before_changing_anything(bits):
    """RMSprop exposes ``momentum`` (torch's key, 0) so schedulers find it; a non-zero value
    (OneCycleLR's default cycle_momentum=True sets one) is refused by step() with a message
    naming momentum and cycle_momentum, before any parameter or state changes."""
    params = make_params()
    opt = make("RMSprop", bits, params)
    assert opt.defaults["momentum"] == 0.0 and opt.param_groups[0]["momentum"] == 0.0
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"momentum=0\.95 \(param group 0\).*cycle_momentum=False"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state


@pytest.mark.parametrize("bits", [8, 32])
def test_rmsprop_with_momentum_under_one_cycle_lr_follows_torch(bits):
    """RMSprop constructed with momentum > 0 keeps torch's momentum buffer (a second state, signed
    map); OneCycleLR(cycle_momentum=True) then cycles it. 32-bit equals torch.optim.RMSprop on the
    same schedule; 8-bit tracks it."""
    params = make_params()
    tparams = clone_params(params)
    opt = make("RMSprop", bits, params, momentum=0.9, weight_decay=1e-3)
    topt = torch.optim.RMSprop(tparams, lr=1e-3, momentum=0.9, weight_decay=1e-3)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10) for o in (opt, topt)]
    momenta = []
    for s in range(8):
        set_grads(params, s)
        set_grads(tparams, s)
        opt.step()
        topt.step()
        for sched in scheds:
            sched.step()
        momenta.append(opt.param_groups[0]["momentum"])
    assert len(set(momenta)) > 1 and momenta[-1] == topt.param_groups[0]["momentum"]
    st = opt.state[params[0]]
    assert st["state2"].dtype == (torch.uint8 if bits == 8 else torch.float32)  # the momentum buffer
    for p, q, p0 in zip(params, tparams, make_params()):
        if bits == 32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            rel = float((p - q).detach().norm() / (q - p0).detach().norm())
            assert rel < 0.05, f"8-bit displacement differs from torch's by {rel:.4f}"


@cases
def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned(name, bits):
    params = make_params()
    opt = make(name, bits, params)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen == [True] and isinstance(loss, torch.Tensor)


@cases
def test_add_param_group_steps_and_round_trips(name, bits):
    params = make_params()
    extra = torch.nn.Parameter(torch.randn(20, 10))
    opt = make(name, bits, params)
    run(opt, params, 1)
    opt.add_param_group({"params": [extra], "lr": 1e-4})
    assert opt.param_groups[1]["lr"] == 1e-4
    for key, value in opt.defaults.items():  # defaults fill what the group leaves out
        if key != "lr":
            assert opt.param_groups[1][key] == value
    before = extra.detach().clone()
    run(opt, params + [extra], 2, start=1)
    assert not torch.equal(extra.detach(), before) and opt.state[extra]["step"] == 2
    params2, extra2 = clone_params(params), torch.nn.Parameter(extra.detach().clone())
    opt2 = make(name, bits, params2)
    opt2.add_param_group({"params": [extra2], "lr": 1e-4})
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as in torch, a loaded state may alias its source
    run(opt, params + [extra], 1, start=3)
    run(opt2, params2 + [extra2], 1, start=3)
    assert_same(params + [extra], params2 + [extra2], opt, opt2)


@cases
def test_zero_grad_both_ways_and_no_grad_is_a_noop(name, bits):
    params = make_params()
    opt = make(name, bits, params)
    before = [p.detach().clone() for p in params]
    opt.step()  # no gradients: nothing moves, no state is made
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    set_grads(params, 0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    set_grads(params, 0)
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in params)


@cases
def test_repr_and_step_hooks(name, bits):
    params = make_params()
    opt = make(name, bits, params)
    assert type(opt).__name__ in repr(opt)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    run(opt, params, 1)
    assert calls == ["pre", "post"]


@cases
def test_parameters_swapped_into_param_groups_keep_name_state_and_overrides(name, bits):
    """What FSDP2-after-the-optimizer (accelerate) does, here with plain tensors: a tensor put in
    place of another takes its name, its overrides and its state, and steps as it would have."""
    params = make_params()
    ref_params = clone_params(params)
    opt = make(name, bits, [("w", params[0]), ("b", params[1])], overrides={"b": {"lr": 0.0}})
    ref = make(name, bits, [("w", ref_params[0]), ("b", ref_params[1])], overrides={"b": {"lr": 0.0}})
    run(opt, params, 2)
    run(ref, ref_params, 2)
    swapped = clone_params(params)
    opt.param_groups[0]["params"] = list(swapped)
    run(opt, swapped, 2, start=2)
    run(ref, ref_params, 2, start=2)
    assert opt.param_name(swapped[1]) == "b" and len(opt.state) == 2
    assert_same(swapped, ref_params, opt, ref)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1] and sd["state"][0]["step"] == 4
