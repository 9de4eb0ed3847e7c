"""torch's own optimizer test inputs, run on dist8 (``torch.testing._internal.common_optimizers``).

torch's ``test/optim/test_optim.py`` builds every configuration of its optimizers from
``optim_db``: ``optim_inputs_func`` (hyperparameter sets: tensor LRs, weight decay, momentum,
``maximize``, ``amsgrad``, ...), ``scheduler_inputs`` (LR schedulers, ReduceLROnPlateau
included) and ``optim_error_inputs_func`` (inputs that must fail). Here each torch optimizer
that dist8 has a counterpart of gets the same inputs, so a configuration torch adds later is
tested without anyone here writing it down:

* each configuration either trains in the right direction with torch's recipe
  (``test_forloop_goes_right_direction``: contiguous and non-contiguous parameters, with and
  without the schedulers; 8- and 32-bit state) or is refused at construction with a one-line
  error naming one of its keys (what dist8 does not implement: ``amsgrad``, ``centered``,
  ``initial_accumulator_value``, SGD without momentum, torch's implementation switches);
* each configuration dist8 accepts follows torch's own optimizer with 32-bit state (the same
  parameters to float rounding over 8 steps of the same gradients);
* zero gradients without weight decay leave the parameters alone (torch's
  ``test_step_is_noop_for_zero_grads``);
* each input torch refuses, dist8 refuses too, except the deviations listed in
  ``DEVIATIONS`` with the reason.
"""
import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau

import dist8

pytest.importorskip("expecttest", reason="torch's test helpers import expecttest (in the [test] extras)")
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

# torch class -> dist8 family (8-bit class; optim_bits=32 gives the 32-bit state)
COUNTERPART = {torch.optim.Adam: dist8.Adam8bit, torch.optim.AdamW: dist8.AdamW8bit, torch.optim.SGD: dist8.SGD8bit,
               torch.optim.RMSprop: dist8.RMSprop8bit, torch.optim.Adagrad: dist8.Adagrad8bit}
INFOS = [info for info in optim_db if info.optim_cls in COUNTERPART]
IDS = [info.optim_cls.__name__ for info in INFOS]

# torch error inputs dist8 accepts on purpose: (optimizer name or "*", start of torch's description) -> why
DEVIATIONS = {
    ("*", "all optimizer params should be with/without names"):
        "dist8 takes named next to unnamed parameters (names are for overrides; unnamed ones are listed by position)",
    ("*", "all optimizer param groups should be with/without names"):
        "the same, across param groups",
    ("*", "betas must be either both floats or both Tensors"):
        "dist8 reads each beta as a number (a 0-d tensor counts) at every step; torch's rule is for its "
        "capturable/fused implementations",
}


def _deviation(name: str, desc: str) -> str | None:
    for (opt, start), why in DEVIATIONS.items():
        if opt in ("*", name) and desc.startswith(start):
            return why
    return None


def _construct(info, params, kwargs, bits):
    return COUNTERPART[info.optim_cls](params, **kwargs, optim_bits=bits, min_8bit_size=0)


def _assert_refusal_names_a_key(exc: Exception, kwargs: dict, what: str) -> None:
    msg = str(exc)
    assert isinstance(exc, (ValueError, TypeError)), f"{what}: {type(exc).__name__}: {msg}"
    assert "\n" not in msg.strip(), f"{what}: a multi-line error: {msg!r}"
    keys = set(kwargs) | {"momentum"}  # SGD8bit refuses torch's default momentum 0, naming it
    assert any(k in msg for k in keys), f"{what}: the error names none of {sorted(keys)}: {msg}"


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_torch_inputs_train_in_the_right_direction_or_are_refused_naming_a_key(info, bits):
    name = info.optim_cls.__name__
    trained = 0
    for contiguous in (True, False):
        for schedulers in [None] + list(info.scheduler_inputs):
            for optim_input in info.optim_inputs_func(device="cpu"):  # fresh: schedulers mutate tensor LRs
                kwargs = dict(optim_input.kwargs)
                what = f"{name} {optim_input.desc!r} {kwargs} ({bits}-bit)"
                gen = torch.Generator().manual_seed(0)
                if contiguous:
                    weight = Parameter(torch.randn((10, 5), generator=gen))
                    bias = Parameter(torch.randn((10,), generator=gen))
                else:
                    weight = Parameter(torch.randn((10, 5, 2), generator=gen)[..., 0])
                    bias = Parameter(torch.randn((10, 2), generator=gen)[..., 0])
                inp = torch.randn(5, generator=gen)
                try:
                    opt = _construct(info, [weight, bias], kwargs, bits)
                except (ValueError, TypeError) as exc:
                    _assert_refusal_names_a_key(exc, kwargs, what)
                    continue
                scheds = [make(opt) for make in (schedulers or [])]

                def closure():
                    opt.zero_grad()
                    loss = (weight.mv(inp) + bias).pow(2).sum()
                    loss.backward()
                    return loss

                initial = closure().item()
                for _ in range(20):
                    loss = opt.step(closure)
                    for sched in scheds:
                        sched.step(loss.detach()) if isinstance(sched, ReduceLROnPlateau) else sched.step()
                final = closure().item()
                if kwargs.get("maximize", False):
                    assert final > initial, what
                else:
                    assert final < initial, what
                trained += 1
    assert trained > 0, f"{name}: no torch configuration trained"  # the test must be able to fail


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_torch_inputs_in_32_bits_follow_torchs_own_optimizer(info):
    """Each configuration dist8 accepts, with 32-bit state, against torch's own optimizer (its
    for-loop implementation) on the same gradients: the same parameters to float rounding."""
    name = info.optim_cls.__name__
    compared = 0
    for optim_input in info.optim_inputs_func(device="cpu"):
        kwargs = dict(optim_input.kwargs)
        what = f"{name} {optim_input.desc!r} {kwargs}"
        gen = torch.Generator().manual_seed(1)
        start = [torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)]
        ours = [Parameter(t.clone()) for t in start]
        theirs = [Parameter(t.clone()) for t in start]
        try:
            opt = _construct(info, ours, kwargs, 32)
        except (ValueError, TypeError) as exc:
            _assert_refusal_names_a_key(exc, kwargs, what)
            continue
        ref_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}  # torch's defaults
        if "foreach" in info.supported_impls:
            ref_kwargs["foreach"] = False
        ref = info.optim_cls(theirs, **ref_kwargs)
        for step in range(8):
            grads = [torch.randn(t.shape, generator=gen) for t in start]
            for p, q, g in zip(ours, theirs, grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        compared += 1
    assert compared > 0, f"{name}: no torch configuration compared"


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_zero_gradients_leave_parameters_alone(info, bits):
    """torch's ``test_step_is_noop_for_zero_grads``: without weight decay, steps on zero gradients
    change no parameter (an all-zero block's absmax is 0; nothing divides by it)."""
    checked = 0
    # torch's inputs, and one without weight decay for those (AdamW) whose default has it
    for kwargs in [dict(i.kwargs) for i in info.optim_inputs_func(device="cpu")] + [{"weight_decay": 0.0}]:
        params = [Parameter(torch.randn(300, 20, generator=torch.Generator().manual_seed(2))), Parameter(torch.randn(7))]
        before = [p.detach().clone() for p in params]
        try:
            opt = _construct(info, params, kwargs, bits)
        except (ValueError, TypeError):
            continue  # refusals: test_torch_inputs_train_in_the_right_direction_or_are_refused_naming_a_key
        if opt.param_groups[0]["weight_decay"] != 0:  # given, or the default (AdamW's 0.01, as torch's)
            continue
        for _ in range(3):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        for p, b in zip(params, before):
            assert torch.equal(p, b), f"{info.optim_cls.__name__} {kwargs} ({bits}-bit)"
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("info", [i for i in INFOS if i.optim_error_inputs_func is not None],
                         ids=[n for n, i in zip(IDS, INFOS) if i.optim_error_inputs_func is not None])
def test_inputs_torch_refuses_are_refused(info):
    name = info.optim_cls.__name__
    checked = 0
    for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        desc = optim_input.desc
        if _deviation(name, desc):
            continue
        # torch checks hyperparameters before parameters, and some inputs leave params None
        params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(10, 5))]
        kwargs = dict(optim_input.kwargs)
        if info.optim_cls is torch.optim.SGD:
            kwargs = {"momentum": 0.9, **kwargs}  # SGD8bit needs momentum (no state without it)
        what = f"{name} {desc!r} {kwargs}"
        try:
            opt = COUNTERPART[info.optim_cls](params, **kwargs)
            for p in [q for g in opt.param_groups for q in g["params"]]:
                p.grad = torch.zeros_like(p)
            opt.step()
        except (ValueError, TypeError) as exc:
            assert "\n" not in str(exc).strip(), f"{what}: a multi-line error: {exc}"
            checked += 1
            continue
        pytest.fail(f"{what}: torch refuses it ({error_input.error_type.__name__}: {error_input.error_regex}), "
                    "dist8 took it")
    assert checked > 0
