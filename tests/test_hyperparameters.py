"""Every bad hyperparameter is refused with a ValueError naming it: at construction, in
add_param_group, in name overrides (naming the pattern, at construction; a pattern matching no
parameter is refused too) and in
load_state_dict (naming the group); duplicate parameters are refused naming them."""
from __future__ import annotations

import math

import pytest
import torch

import dist8
import dist8.optim as d8

NAN = float("nan")
BAD = [
    (d8.AdamW8bit, dict(eps=NAN), "eps"),
    (d8.AdamW8bit, dict(weight_decay=NAN), "weight_decay"),
    (d8.AdamW8bit, dict(lr=NAN), "lr"),
    (d8.AdamW8bit, dict(lr=-5), "lr"),
    (d8.AdamW8bit, dict(lr=math.inf), "lr"),
    (d8.AdamW8bit, dict(eps=-1e-8), "eps"),
    (d8.AdamW8bit, dict(betas=(0.9,)), "betas"),
    (d8.AdamW8bit, dict(betas=(0.9, 0.99, 0.999)), "betas"),
    (d8.AdamW8bit, dict(betas=0.9), "betas"),
    (d8.AdamW8bit, dict(betas=(NAN, 0.999)), r"betas\[0\]"),
    (d8.AdamW8bit, dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (d8.AdamW8bit, dict(percentile_clipping=NAN), "percentile_clipping"),
    (d8.AdamW8bit, dict(min_8bit_size=-1), "min_8bit_size"),
    (d8.AdamW8bit, dict(on_nonfinite="ignore"), "on_nonfinite"),
    (d8.Lion8bit, dict(betas=(0.9, NAN)), r"betas\[1\]"),
    (d8.LAMB8bit, dict(max_unorm=NAN), "max_unorm"),
    (d8.LAMB8bit, dict(max_unorm=-1.0), "max_unorm"),
    (d8.SGD8bit, dict(lr=0.1, momentum=NAN), "momentum"),
    (d8.SGD8bit, dict(lr=0.1, momentum=0.9, dampening=NAN), "dampening"),
    (d8.RMSprop8bit, dict(alpha=NAN), "alpha"),
    (d8.Adagrad8bit, dict(lr_decay=NAN), "lr_decay"),
    (d8.Adagrad8bit, dict(eps=math.inf), "eps"),
    (d8.RMSprop8bit, dict(alpha=1.0), "alpha"),
    (d8.AdEMAMix8bit, dict(betas=(0.9, 0.999)), "betas"),
    (d8.AdEMAMix8bit, dict(betas=(0.9, 0.999, 1.0)), r"betas\[2\]"),
    (d8.AdEMAMix8bit, dict(betas=(0.9, NAN, 0.9999)), r"betas\[1\]"),
    (d8.AdEMAMix8bit, dict(alpha=NAN), "alpha"),
    (d8.AdEMAMix8bit, dict(alpha=-1.0), "alpha"),
    (d8.AdEMAMix8bit, dict(alpha=math.inf), "alpha"),
    (d8.AdEMAMix8bit, dict(t_alpha=-1), "t_alpha"),
    (d8.AdEMAMix8bit, dict(t_alpha=2.5), "t_alpha"),
    (d8.AdEMAMix8bit, dict(t_beta3="100"), "t_beta3"),
    (d8.AdEMAMix8bit, dict(t_beta3=100, betas=(0.0, 0.999, 0.9999)), "betas"),
    (d8.AdEMAMix8bit, dict(weight_decay=NAN), "weight_decay"),
    (d8.AdEMAMix8bit, dict(eps=-1.0), "eps"),
    # finite, but inf as the kernels' float32: LAMB/LARS made every parameter inf, the others
    # skipped every block as non-finite, step after step
    (d8.LAMB8bit, dict(lr=1e300), "lr must be within float32's range"),
    (d8.LARS8bit, dict(lr=1e39), "lr must be within float32's range"),
    (d8.AdamW8bit, dict(weight_decay=4e38), "weight_decay must be within float32's range"),
    (d8.AdEMAMix8bit, dict(alpha=1e39), "alpha must be within float32's range"),
    # booleans read by their truthiness before: "no" meant True, None False
    (d8.LAMB8bit, dict(bias_correction="no"), "bias_correction"),
    (d8.LAMB8bit, dict(adam_w_mode=None), "adam_w_mode"),
    (d8.SGD8bit, dict(lr=0.1, momentum=0.9, nesterov="yes"), "nesterov"),
    (d8.RMSprop8bit, dict(centered="no"), "centered"),
]
CONSTRUCTOR_ONLY = ("on_nonfinite", "centered")  # not group keys
IDS = [f"{cls.__name__}-{key}-{i}" for i, (cls, _, key) in enumerate(BAD)]


def _params():
    return [("w", torch.nn.Parameter(torch.randn(8, 8)))]


def _base_kwargs(cls):
    return dict(lr=0.1, momentum=0.9) if cls in (d8.SGD8bit, d8.LARS8bit) else {}


@pytest.mark.parametrize("cls,kw,key", BAD, ids=IDS)
def test_construction_names_the_key(cls, kw, key):
    with pytest.raises(ValueError, match=key):
        cls(_params(), **dict(_base_kwargs(cls), **kw))


@pytest.mark.parametrize("kw,key", [
    (dict(eps=torch.full((300,), 1e-8)), "eps"),
    (dict(lr=torch.arange(100.0)), "lr"),
    (dict(weight_decay=torch.zeros(2, 40)), "weight_decay"),
    (dict(betas=torch.tensor([0.9, 0.999, 0.5])), "betas"),
    (dict(betas=tuple([0.9] * 200)), "betas"),
    (dict(on_nonfinite=torch.zeros(30)), "on_nonfinite"),
    (dict(quant_map=torch.linspace(-1, 1, 256)), "quant_map"),
    (dict(optim_bits=torch.tensor([8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8])), "optim_bits"),
    (dict(master_weight_bits=torch.tensor([24, 24])), "master_weight_bits"),
    (dict(max_unorm=torch.ones(3)), "max_unorm"),
    # flags: a tensor or a string would otherwise fail as "Boolean value of Tensor ... is ambiguous"
    # or be read as True
    (dict(block_wise=torch.ones(3)), "block_wise"),
    (dict(amsgrad=torch.ones(3)), "amsgrad"),
    (dict(is_paged="no"), "is_paged"),
    (dict(check_finite=torch.ones(3)), "check_finite"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_value_error_is_one_short_line(kw, key):
    """A tensor (or a long sequence) where a number or name belongs: the error names the key on one
    line of bounded length, not the value's multi-line repr."""
    with pytest.raises(ValueError, match=key) as info:
        d8.AdamW8bit(_params(), **kw)
    message = str(info.value)
    assert "\n" not in message and len(message) < 200, message


@pytest.mark.parametrize("cls,kw,key", [b for b in BAD if b[2] not in CONSTRUCTOR_ONLY],
                         ids=[i for i, b in zip(IDS, BAD) if b[2] not in CONSTRUCTOR_ONLY])
def test_add_param_group_names_the_key_and_adds_nothing(cls, kw, key):
    opt = cls(_params(), **_base_kwargs(cls))
    with pytest.raises(ValueError, match=f"{key}.*param group 1"):
        opt.add_param_group(dict({"params": [torch.nn.Parameter(torch.randn(3))]}, **kw))
    assert len(opt.param_groups) == 1


def test_override_checked_at_construction_naming_the_pattern():
    for extra, key in (({"lr": -5}, "lr"), ({"eps": NAN}, "eps"), ({"betas": (0.9,)}, "betas")):
        with pytest.raises(ValueError, match=f"{key}.*override 'w\\*'"):
            d8.AdamW8bit(_params(), overrides={"w*": extra})


def test_override_pattern_that_matches_no_parameter_is_refused():
    """A typo in an overrides pattern would silently leave the parameter at the defaults: refused at
    construction naming the pattern, for the unsharded optimizer and ShardedOptimizer (which checks
    every parameter's name, not only its own rank's pieces); unnamed parameters cannot be matched."""
    from dist8.shard import ShardedOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    for make in (lambda ov: d8.AdamW8bit(model.named_parameters(), overrides=ov),
                 lambda ov: ShardedOptimizer(model.named_parameters(), d8.AdamW8bit, overrides=ov)):
        make({"*.bias": {"lr": 0.5}, "1.weight": {"optim_bits": 32}})
        with pytest.raises(ValueError, match=r"^overrides pattern 'lm_head\.\*' matches no parameter name "
                                             r"\(names look like 0\.weight, 0\.bias"):
            make({"*.bias": {"lr": 0.5}, "lm_head.*": {"lr": 0.5}})
    with pytest.raises(ValueError, match=r"^overrides match parameter names, and these parameters have none"):
        d8.AdamW8bit(model.parameters(), overrides={"*.bias": {"lr": 0.5}})
    # torch names a tied weight once (named_parameters() drops duplicates): the message says so
    tied = torch.nn.ModuleDict({"wte": torch.nn.Embedding(10, 8), "lm_head": torch.nn.Linear(8, 10, bias=False)})
    tied.lm_head.weight = tied.wte.weight
    with pytest.raises(ValueError, match=r"'lm_head\.weight' matches no .*wte\.weight; a tied weight.* is named once"):
        d8.AdamW8bit(tied.named_parameters(), overrides={"lm_head.weight": {"lr": 0.5}})


def test_module_override_marks_checked_at_construction():
    """``GlobalOptimManager`` marks made before the optimizer exists are validated when it is built,
    like ``overrides=`` patterns, not at the first step."""
    emb = torch.nn.Embedding(100, 16)
    d8.GlobalOptimManager.get_instance().register_module_override(emb, "weight", {"optim_bits": 7})
    with pytest.raises(ValueError, match=r"^optim_bits must be 8 or 32 \(overrides for parameter weight\), got 7"):
        d8.AdamW8bit(emb.named_parameters())


def test_load_state_dict_names_the_group():
    opt = d8.AdamW8bit(_params())
    sd = opt.state_dict()
    sd["param_groups"][0]["eps"] = NAN
    with pytest.raises(ValueError, match="eps.*param group 0 of the loaded state dict"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["eps"] == 1e-8  # nothing loaded


def test_duplicate_parameters_refused_naming_them():
    w = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"^parameter w2 is listed twice in param group 0 \(also as w\)"):
        d8.AdamW8bit([("w", w), ("w2", w)])
    with pytest.raises(ValueError, match=r"^parameter index 1 is listed twice in param group 0 \(also as index 0\)"):
        d8.AdamW8bit([w, w])
    v = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"^parameter index 1 of param group 1 is already in param group 0 "
                                         r"\(as group 0 index 0\)"):
        d8.AdamW8bit([{"params": [w]}, {"params": [v, w]}])
    opt = d8.AdamW8bit([("w", w)])
    with pytest.raises(ValueError, match=r"^parameter w_again of param group 1 is already in param group 0 \(as w\)"):
        opt.add_param_group({"params": [("w_again", w)]})
    with pytest.raises(ValueError, match=r"^parameter index 0 of param group 1 is already in param group 0 \(as w\)"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1 and "w_again" not in opt.param_names.values()


def test_a_parameter_appended_twice_to_param_groups_by_hand_is_refused_at_the_step():
    """torch lets code extend ``group["params"]`` directly; a parameter put there a second time (or
    into another group) would be updated twice per step (found by a probe: its step count went 1 -> 3).
    Refused at step, state_dict and load_state_dict, naming it, before anything changes."""
    w, v = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(600))
    opt = d8.AdamW8bit([("w", w)], min_8bit_size=0)
    w.grad = torch.randn(600)
    opt.step()
    opt.param_groups[0]["params"].append(v)  # a new parameter appended by hand: fine
    v.grad = torch.randn(600)
    opt.step()
    assert opt.state[v]["step"] == 1 and opt.state[w]["step"] == 2
    opt.param_groups[0]["params"].append(w)
    before = (w.detach().clone(), v.detach().clone(), {k: t.clone() for k, t in opt.state[w].items() if torch.is_tensor(t)})
    for call in (opt.step, opt.state_dict):
        with pytest.raises(ValueError, match=r"^parameter w is in param_groups twice \(group 0 index 0 and group 0 "
                                             r"index 2\): it would be updated twice per step"):
            call()
    assert torch.equal(w, before[0]) and torch.equal(v, before[1]) and opt.state[w]["step"] == 2
    assert all(torch.equal(opt.state[w][k], t) for k, t in before[2].items())
    opt.param_groups[0]["params"].pop()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    opt.param_groups[1]["params"].append(v)  # across groups too
    with pytest.raises(ValueError, match=r"in param_groups twice \(group 0 index 1 and group 1 index 1\)"):
        opt.step()
    opt.param_groups[1]["params"].pop()
    opt.step()  # mended: steps again, each once
    assert opt.state[w]["step"] == 3 and opt.state[v]["step"] == 2


@pytest.mark.parametrize("bad", [float("nan"), -2, 2.5, True, "3"])
def test_a_step_count_written_into_the_state_by_hand_is_checked_at_the_step(bad):
    """``state["step"]`` edited between steps gets the load path's rule (a whole number in [0, 2**62]): NaN
    made every later step of the parameter a non-finite skip, -2 failed with "math domain error" naming
    nothing. Refused naming the parameter, before any parameter changes; torch's tensor steps still work."""
    w, v = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(600))
    opt = d8.AdamW8bit([("w", w), ("v", v)], min_8bit_size=0)
    for p in (w, v):
        p.grad = torch.randn(600)
    opt.step()
    opt.state[v]["step"] = bad
    before = [w.detach().clone(), v.detach().clone(), opt.state[w]["state1"].clone()]
    with pytest.raises(ValueError, match=r"^step of parameter v must be a whole number in \[0, 2\*\*62\], got .*written "
                                         r"into its optimizer state after its last step.*del optimizer\.state\[param\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, [w, v, opt.state[w]["state1"]]))
    assert opt.state[w]["step"] == 1
    opt.state[v]["step"] = torch.tensor(1.0)  # what torch's own optimizers keep there
    opt.step()
    assert opt.state[v]["step"] == 2 and opt.state[w]["step"] == 2


@pytest.mark.parametrize("edit,match", [
    (lambda st: st.__setitem__("absmax1", st["absmax1"][:2].clone()), r"absmax1 of parameter v has 2 entries"),
    (lambda st: st.__setitem__("absmax1", st["absmax1"].int()), r"absmax1 of parameter v has dtype torch.int32"),
    (lambda st: st.__setitem__("state2", st["state2"].half()), r"state2 of parameter v has dtype torch.float16"),
    (lambda st: st.pop("state2"), r"state for parameter v has no 'state2'"),
    (lambda st: st.__setitem__("state2", torch.stack([st["state2"]] * 2, 1)[:, 0]), r"state2 of parameter v is not contiguous"),
], ids=["absmax-short", "absmax-int", "codes-half", "key-deleted", "strided"])
def test_state_tensors_replaced_by_hand_are_named_when_the_kernel_refuses_them(edit, match):
    """The kernels refuse a state tensor of the wrong kind ("dist8: absmax1 must be float32 with 3 entries",
    or a bare KeyError 'state2') without naming the parameter; the step now names it with the load path's
    schema, checked only once the kernel has failed (nothing on the common path). The refused step changes
    nothing: ``w``, stepped in the same kernel call, kept its step count too (it read 2 after the refusal,
    though ``w`` had not moved), so it continues as a run that was never refused, bitwise."""
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(600))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = d8.AdamW8bit([("w", w), ("v", v)], min_8bit_size=0)
    ref = d8.AdamW8bit([("w", w_ref)], min_8bit_size=0)
    for p in (w, v):
        p.grad = torch.randn(600)
    w_ref.grad = w.grad.clone()
    opt.step()
    ref.step()
    edit(opt.state[v])
    before = w.detach().clone()
    with pytest.raises(ValueError, match=f"^{match}.*edited after its last step.*del optimizer\\.state\\[param\\]"):
        opt.step()
    assert opt.state[w]["step"] == 1 and torch.equal(w, before)
    del opt.state[v]  # the fix the message names
    opt.step()
    ref.step()
    assert opt.state[v]["step"] == 1 and opt.state[w]["step"] == 2
    assert torch.equal(w, w_ref) and torch.equal(opt.state[w]["state1"], ref.state[w_ref]["state1"])


def test_a_refused_kernel_call_leaves_the_gradient_norm_history_of_its_parameters_alone():
    """With percentile clipping each parameter's step is its own kernel call. When one call is refused (state
    edited by hand), the parameters whose calls had not run keep their step count and their gradient-norm
    history as they were (this step's norm stayed in the history of parameters that were not stepped, and
    every later clip of theirs read it); those stepped before it count the step they took."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(600)) for _ in range(3)]
    opt = d8.AdamW8bit([(f"p{i}", p) for i, p in enumerate(params)], min_8bit_size=0, percentile_clipping=50)
    for p in params:
        p.grad = torch.randn(600)
    opt.step()
    opt.state[params[1]]["absmax1"] = opt.state[params[1]]["absmax1"][:2].clone()
    history = [opt.state[p]["gnorm_vec"].clone() for p in params]
    with pytest.raises(ValueError, match="absmax1 of parameter p1 has 2 entries"):
        opt.step()
    assert [opt.state[p]["step"] for p in params] == [2, 1, 1]
    assert not torch.equal(opt.state[params[0]]["gnorm_vec"], history[0])  # p0 was stepped: its norm is in
    for p, h in zip(params[1:], history[1:]):
        assert torch.equal(opt.state[p]["gnorm_vec"], h)


def test_lamb_max_unorm_clips_the_update():
    """max_unorm clips |ratio * u| to max_unorm * |p| as bitsandbytes does; 0 (off) and the
    default 1.0 give the plain trust ratio."""
    def run(**kw):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 64))
        opt = d8.LAMB8bit([p], lr=0.1, min_8bit_size=0, **kw)
        before = p.detach().clone()
        p.grad = torch.randn(64, 64)
        opt.step()
        return float((p.detach() - before).norm()), float(before.norm())

    plain, p_norm = run(max_unorm=0.0)
    default, _ = run()
    clipped, _ = run(max_unorm=0.01)
    assert default == pytest.approx(plain, rel=1e-6)
    assert plain == pytest.approx(0.1 * p_norm, rel=1e-3)  # the trust ratio: |lr * ratio * u| = lr * |p|
    assert clipped == pytest.approx(0.1 * 0.01 * p_norm, rel=1e-3)


@pytest.mark.parametrize("key, value, match", [
    ("lr", float("nan"), "lr must be a finite number"),
    ("lr", -1.0, "lr must be >= 0"),
    ("betas", (0.9,), "betas must be a pair"),
    ("weight_decay", float("inf"), "weight_decay must be a finite number"),
    ("lr", 1e300, "lr must be within float32's range"),
])
def test_hyperparameter_changed_between_steps_is_refused_before_anything_moves(key, value, match):
    # A scheduler or user code writing a bad value into param_groups between steps: the next
    # step names it instead of silently skipping every block as non-finite (or stepping uphill).
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300, 5))
    opt = dist8.AdamW8bit([p], min_8bit_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p, before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    assert opt.nonfinite_skips == 0


def test_tensor_lr_filled_in_place_with_nan_is_refused():
    p = torch.nn.Parameter(torch.randn(300, 5))
    lr = torch.tensor(1e-3)
    opt = dist8.AdamW8bit([p], lr=lr, min_8bit_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    lr.fill_(float("nan"))  # what torch's schedulers do to a tensor lr
    with pytest.raises(ValueError, match="lr must be a finite number"):
        opt.step()


def test_a_key_deleted_from_a_live_group_is_named_at_the_next_step():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = d8.AdamW8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    del opt.param_groups[0]["eps"]
    with pytest.raises(ValueError, match=r"^param group 0 has no 'eps'; every group of AdamW8bit needs \["):
        opt.step()
    assert opt.state[p]["step"] == 1


def test_an_lr_override_is_fixed_and_said_so_when_a_scheduler_is_seen():
    """An ``lr`` in ``overrides`` replaces the group's lr, as bitsandbytes' GlobalOptimManager's does, so an LR
    scheduler does not move it: with ``LambdaLR(lambda t: 0.0)`` the other parameters stand still and the
    overridden one goes on at its lr (found by an audit; it was said nowhere). Kept -- bitsandbytes-style
    code relies on it (``{"lr": 0.0}`` freezes a parameter) -- and warned once per optimizer, naming the
    parameter, when its group has a scheduler's ``initial_lr``; a param group of its own is scheduled."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    opt = d8.AdamW32bit(model.named_parameters(), lr=1e-2, overrides={"1.*": {"lr": 5e-3}})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0)
    start = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    fixed = [str(w.message) for w in seen if "lr override" in str(w.message)]
    assert fixed == ["parameter 1.weight has an lr override (0.005), which is fixed: LR schedulers change the param "
                     "groups' lr, not overrides (as with bitsandbytes' GlobalOptimManager). To schedule it, give it a "
                     "param group of its own with that lr"]
    moved = [not torch.equal(p, s) for p, s in zip(model.parameters(), start)]
    assert moved == [False, False, True, True]
    # no scheduler, no warning
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = d8.AdamW32bit(model.named_parameters(), lr=1e-2, overrides={"1.*": {"lr": 5e-3}})
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
    assert not [w for w in seen if "lr override" in str(w.message)]


def test_numbers_beyond_float_range_and_huge_blocks_are_one_line_naming_the_key():
    """Found by an audit: ``lr=10**400`` (a Python int, as JSON or YAML give one) failed as a bare
    OverflowError naming nothing, in the constructor and in a DeepSpeed config; ``block_size=2**30`` was
    accepted and the first step died in the kernel (std::bad_alloc: a block's values are held per thread)."""
    from dist8.integrations.deepspeed_config import check_config

    p = torch.nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match=r"^lr must be within float32's range"):
        d8.AdamW8bit([p], lr=10**400)
    with pytest.raises(ValueError, match=r"^eps must be within float32's range"):
        d8.AdamW8bit([p], eps=-10**400)
    with pytest.raises(ValueError, match=r"^block_size must be a power of two in \[64, 65536\], got 1073741824"):
        d8.AdamW8bit([p], block_size=1 << 30)
    d8.AdamW8bit([p], block_size=1 << 16)  # the largest taken
    with pytest.raises(ValueError,
                       match=r"^DeepSpeed config optimizer.params.lr must be a number within float's range, got 1111"):
        check_config({"optimizer": {"type": "dist8.AdamW8bit", "params": {"lr": int("1" * 400)}}})


def test_malformed_state_dicts_are_one_line_naming_the_entry():
    """Found by an audit: a state dict whose ``state`` is a list, whose ``param_groups`` is None or holds a
    non-dict, or a group without ``params`` failed as bare AttributeError/TypeError/KeyError naming nothing; a
    malformed ``"dist8"`` entry (5, a quant_map of None, another key) was ignored, so codes written with
    the dynamic map loaded into an fp8-map optimizer as other numbers; a step of 10**30 was taken and the
    next checkpoint save failed on it naming its own temp file."""
    import copy

    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = d8.AdamW8bit([("w", p)], min_8bit_size=0)
    p.grad = torch.randn_like(p)
    opt.step()
    good = opt.state_dict()
    cases = [(lambda d: d.update(state=[1]), r"^state_dict\['state'\] must be a dict of per-parameter state"),
             (lambda d: d.update(param_groups=None), r"^state_dict\['param_groups'\] must be a list of dicts"),
             (lambda d: d.update(param_groups=[5]), r"^state_dict\['param_groups'\]\[0\] must be a dict with"),
             (lambda d: d["param_groups"][0].pop("params"), r"^state_dict\['param_groups'\]\[0\] must be a dict with"),
             (lambda d: d.update(dist8=5), r"^state_dict\['dist8'\] must be a dict whose 'quant_map' names the map"),
             (lambda d: d.update(dist8={"quant_map": None}), r"^state_dict\['dist8'\] must be a dict whose"),
             (lambda d: d.update(dist8={"map": "dynamic"}), r"^state_dict\['dist8'\] must be a dict whose"),
             (lambda d: d["state"][0].update(step=10**30), r"^step of parameter w must be a whole number in \[0, 2"),
             (lambda d: d["state"][0].update(step=1 << 63), r"^step of parameter w must be a whole number in \[0, 2")]
    fp8 = d8.AdamW8bit([("w", p)], min_8bit_size=0, quant_map="fp8")  # the one a bad "dist8" entry fooled
    for target, its_cases in ((opt, cases), (fp8, cases[:7])):
        for mutate, match in its_cases:
            bad = copy.deepcopy(good)
            mutate(bad)
            with pytest.raises(ValueError, match=match):
                target.load_state_dict(bad)
    assert torch.equal(opt.state[p]["state1"], good["state"][0]["state1"])  # nothing loaded by a refusal
    ok = copy.deepcopy(good)
    ok["state"][0]["step"] = 1 << 62
    opt.load_state_dict(ok)


def test_loading_a_state_of_the_other_kind_says_the_constructors_choice_is_not_used():
    """A loaded group's values replace the optimizer's (torch's rule), ``optim_bits``/``min_8bit_size`` included,
    so the saved state keeps its kind: an optimizer built with ``optim_bits=32`` went on in 8 bits after loading
    an 8-bit state (and an 8-bit one stayed fp32 after a 32-bit state), without a word (found by an audit of
    client resumes). Kept, and warned naming the key; loading the same settings says nothing."""
    import warnings

    p = torch.nn.Parameter(torch.randn(64, 128))
    saved = d8.AdamW8bit([p], min_8bit_size=0)
    p.grad = torch.randn_like(p)
    saved.step()
    sd = saved.state_dict()
    for kw, said in (({"optim_bits": 32}, "optim_bits=8 (this optimizer: 32)"),
                     ({"min_8bit_size": 10**6}, "min_8bit_size=0 (this optimizer: 1000000)"),
                     ({}, None)):
        opt = d8.AdamW8bit([p], **dict({"min_8bit_size": 0}, **kw))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.load_state_dict(sd)
        told = [str(w.message) for w in seen if "keeps its 8-bit/32-bit kind" in str(w.message)]
        assert told == ([] if said is None else [told[0]]) and (said is None or said in told[0]), (kw, told)
        assert opt.state[p]["state1"].dtype == torch.uint8  # the saved kind, as torch's rule gives
