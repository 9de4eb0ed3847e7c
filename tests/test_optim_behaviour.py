"""State layout, state dicts, overrides, non-finite gradients, clipping and bad input."""
import io
import subprocess
import sys

import warnings

import pytest
import torch

import dist8
from dist8.nn import StableEmbedding
from dist8.optim import AdamW8bit, Lion8bit, SGD8bit, get_optimizer_class
from optim_cases import CASES


def _step(opt, params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()


def test_state_layout_8bit_and_32bit():
    big = torch.nn.Parameter(torch.randn(100, 50))
    small = torch.nn.Parameter(torch.randn(10))
    opt = AdamW8bit([big, small])
    _step(opt, [big, small])
    st = opt.state[big]
    assert st["state1"].dtype == torch.uint8 and st["state1"].shape == big.shape
    assert st["absmax1"].dtype == torch.float32 and st["absmax1"].shape == ((5000 + 255) // 256,)
    assert opt.state[small]["state1"].dtype == torch.float32  # below min_8bit_size


def test_memory_10m_params_is_2_plus_8_over_256_bytes_per_param():
    n = 10_000_000
    p = torch.nn.Parameter(torch.zeros(n))
    opt = AdamW8bit([p])
    _step(opt, [p])
    assert opt.state_nbytes() == n * 2 + ((n + 255) // 256) * 2 * 4
    assert abs(opt.state_nbytes() / n - (2 + 8 / 256)) < 1e-3
    p32 = torch.nn.Parameter(torch.zeros(n))
    ref = torch.optim.AdamW([p32])
    p32.grad = torch.zeros(n)
    ref.step()
    ref_bytes = sum(v.numel() * v.element_size() for v in ref.state[p32].values() if v.dim() > 0)
    assert ref_bytes == 8 * n


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_bit_exact(name):
    cls, kw, _, _ = CASES[name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 20)), torch.nn.Parameter(torch.randn(7))]
    opt = cls(params, **kw)
    for s in range(3):
        _step(opt, params, s)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cls(clones, **kw)
    opt2.load_state_dict(loaded)
    for p, q in zip(params, clones):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), key
            else:
                assert value == other
    _step(opt, params, 9)
    _step(opt2, clones, 9)
    for p, q in zip(params, clones):
        assert torch.equal(p, q)


def test_state_dict_loads_through_zero_redundancy_style_copy():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([p])
    _step(opt, [p])
    sd = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW8bit([q])
    opt2.state[q] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sd["state"][0].items()}  # what OSS does
    _step(opt, [p], 3)
    _step(opt2, [q], 3)
    assert torch.equal(p, q)


def test_load_state_dict_rejects_wrong_shape_naming_parameter():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("layer.weight", p)])
    _step(opt, [p])
    sd = opt.state_dict()
    q = torch.nn.Parameter(torch.randn(4000))
    opt2 = AdamW8bit([("layer.weight", q)])
    with pytest.raises(ValueError, match="layer.weight"):
        opt2.load_state_dict(sd)


def _corrupted(mutate):
    import copy

    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = AdamW8bit([("layer.weight", p)], min_8bit_size=0, percentile_clipping=50)
    _step(opt, [p])
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd["state"][0], sd)
    return sd, p


CORRUPT = {
    # a cast to 16 bits rounds every block's scale (was converted back silently)
    "absmax cast to fp16": (lambda st, sd: st.__setitem__("absmax1", st["absmax1"].half()),
                            r"^absmax1 of parameter layer\.weight has dtype torch.float16; expected torch.float32"),
    # moments without their step count restarted the bias correction at step 1
    "step missing": (lambda st, sd: st.pop("step"), r"state for parameter layer\.weight has no 'step'"),
    # a short clipping history was indexed out of range steps later; negative norms were taken
    "clipping history short": (lambda st, sd: st.__setitem__("gnorm_vec", st["gnorm_vec"][:5]),
                               r"^gnorm_vec of parameter layer\.weight must be 100 finite float32 squared gradient "
                               r"norms >= 0, got a tensor of shape \(5,\)"),
    "clipping history negative": (lambda st, sd: st["gnorm_vec"].fill_(-1.0), r"^gnorm_vec of parameter layer"),
    # was an AttributeError ("'int' object has no attribute 'startswith'") and a NotImplementedError
    "state not a dict": (lambda st, sd: sd["state"].__setitem__(0, [1, 2]),
                         r"^state of parameter layer\.weight must be a dict with string keys, got \[1, 2\]$"),
    "state on the meta device": (lambda st, sd: st.__setitem__("state1", torch.empty_like(st["state1"],
                                                                                          device="meta")),
                                 r"^state1 of parameter layer\.weight is on the meta device"),
    # failed deep in torch's ops, in several lines naming nothing
    "state sparse": (lambda st, sd: st.__setitem__("state1", st["state1"].to_sparse()),
                     r"^state1 of parameter layer\.weight is a torch\.sparse_coo tensor; optimizer state is dense"),
    # loaded and went on into every later lr a scheduler computes
    "initial_lr not a number": (lambda st, sd: sd["param_groups"][0].__setitem__("initial_lr", float("nan")),
                                r"^initial_lr must be a finite number \(param group 0 of the loaded state dict\)"),
    "rule not a name": (lambda st, sd: sd["dist8"].__setitem__("rule", 5),
                        r"^state_dict\['dist8'\]\['rule'\] must name an update rule"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupted_state_dicts_are_refused_naming_parameter_and_key(case):
    mutate, match = CORRUPT[case]
    sd, p = _corrupted(mutate)
    opt2 = AdamW8bit([("layer.weight", p)], min_8bit_size=0, percentile_clipping=50)
    with pytest.raises((ValueError, KeyError), match=match):
        opt2.load_state_dict(sd)
    assert not opt2.state  # nothing loaded


@pytest.mark.parametrize("saved, loading", [
    ("SGD8bit", "Adagrad8bit"), ("Lion8bit", "SGD8bit"), ("RMSprop8bit", "Adagrad8bit"), ("Lion8bit", "LARS8bit"),
    ("AdamW8bit", "RMSprop8bit"), ("RMSprop8bit", "LAMB8bit"), ("Adam8bit", "LAMB8bit"), ("SGD8bit", "LARS8bit")])
def test_a_state_dict_of_another_update_rule_is_refused(saved, loading):
    """A state dict of another dist8 optimizer with as many states loaded without a word: SGD8bit's momentum
    (signed codes) read as Adagrad8bit's sum of squares (-1.88 read as 0.0), AdamW8bit's moments as RMSprop's
    square average and momentum buffer (found by an outside probe). torch's optimizers fail at the next step
    (KeyError 'alpha'). Adam's state under LAMB and SGD's under LARS mean the same and still load."""
    momentum = {"momentum": 0.9}
    kwargs = {"SGD8bit": momentum, "LARS8bit": dict(momentum, lr=1e-2), "RMSprop8bit": momentum}
    p = torch.nn.Parameter(torch.randn(64, 64))
    source = get_optimizer_class(saved)([p], min_8bit_size=0, **kwargs.get(saved, {}))
    _step(source, [p])
    target = get_optimizer_class(loading)([p], min_8bit_size=0, **kwargs.get(loading, {}))
    if {saved, loading} in ({"Adam8bit", "LAMB8bit"}, {"SGD8bit", "LARS8bit"}):
        target.load_state_dict(source.state_dict())
        assert torch.equal(target.state[p]["state1"], source.state[p]["state1"])
        return
    with pytest.raises(ValueError, match=rf"^state_dict was written by an optimizer with update rule "
                                         rf"{source.rule.name}; this one's rule {target.rule.name} keeps other state"):
        target.load_state_dict(source.state_dict())
    assert not target.state


@pytest.mark.parametrize("name", ["AdamW32bit", "RMSprop32bit", "Adagrad32bit"])
def test_a_negative_second_moment_is_refused(name):
    """A 32-bit square average of -1 loaded and stayed about -1 (8-bit absmax and torch conversions refused it)."""
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = get_optimizer_class(name)([p], min_8bit_size=0)
    _step(opt, [p])
    sd = opt.state_dict()
    key = "state2" if name.startswith("Adam") else "state1"
    sd["state"][0][key] = -torch.ones_like(sd["state"][0][key])
    fresh = get_optimizer_class(name)([p], min_8bit_size=0)
    with pytest.raises(ValueError, match=rf"^{key} of parameter group 0 index 0 holds negative values"):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_loaded_group_values_the_loaded_state_cannot_follow_are_refused_at_load():
    """percentile_clipping turned on in a state dict's group over state without a gradient-norm history was
    installed, and the next step() refused it: the optimizer already held the new state."""
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = AdamW8bit([p], min_8bit_size=0)
    _step(opt, [p])
    sd = opt.state_dict()
    sd["param_groups"][0]["percentile_clipping"] = 5
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"has percentile_clipping=5 but its state has no gradient-norm history .*"
                                         r"the state dict's group values do not fit its state"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["percentile_clipping"] == 100
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_a_state_tensor_given_as_a_view_loads_in_its_logical_order():
    """A non-contiguous state tensor of the right shape (a conversion's transpose) was refused at the first
    step by the kernel ('state1 must be contiguous'), naming no parameter; its values load in logical order."""
    sd, p = _corrupted(lambda st, sd: st.__setitem__("state1", st["state1"].t().contiguous().t()))
    opt2 = AdamW8bit([("layer.weight", p)], min_8bit_size=0, percentile_clipping=50)
    opt2.load_state_dict(sd)
    assert opt2.state[p]["state1"].is_contiguous() and torch.equal(opt2.state[p]["state1"], sd["state"][0]["state1"])
    _step(opt2, [p], seed=1)


def test_overrides_by_name_and_stable_embedding():
    model = torch.nn.ModuleDict({"embed": StableEmbedding(1000, 16), "head": torch.nn.Linear(16, 1000)})
    opt = AdamW8bit(model.named_parameters(), overrides={"head.weight": {"optim_bits": 32}})
    out = model["head"](model["embed"](torch.randint(0, 1000, (4, 8)))).sum()
    out.backward()
    opt.step()
    assert opt.state[model["embed"].weight]["state1"].dtype == torch.float32
    assert opt.state[model["head"].weight]["state1"].dtype == torch.float32
    assert opt.state[model["head"].bias]["state1"].dtype == torch.float32  # 1000 < min_8bit_size
    opt8 = AdamW8bit(model.named_parameters())
    opt8.zero_grad()
    model["head"](model["embed"](torch.randint(0, 1000, (4, 8)))).sum().backward()
    opt8.step()
    assert opt8.state[model["head"].weight]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("how", ["to() with swapped parameters", "load_state_dict(assign=True)"])
def test_embedding_keeps_its_32bit_mark_when_the_weight_is_swapped_or_replaced(how):
    """torch.utils.swap_tensors (Module.to under set_swap_module_params_on_conversion, and always for
    FSDP2's DTensors) takes a parameter's attributes with it; assign=True puts in a new parameter. The
    embeddings' weights then got 8-bit state silently; they mark the new contents again."""
    from dist8.nn import Embedding

    for cls in (StableEmbedding, Embedding):
        model = cls(1000, 16)
        if how.startswith("to()"):
            swap = torch.__future__.get_swap_module_params_on_conversion()
            torch.__future__.set_swap_module_params_on_conversion(True)
            try:
                weight = model.weight
                model.to(torch.bfloat16)
                assert model.weight is weight  # swapped in place, attributes exchanged
            finally:
                torch.__future__.set_swap_module_params_on_conversion(swap)
        else:
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        opt = AdamW8bit(model.parameters())
        model(torch.randint(0, 1000, (4, 8))).float().sum().backward()
        opt.step()
        assert opt.state[model.weight]["state1"].dtype == torch.float32, cls.__name__


def test_a_parameter_replaced_by_one_of_another_shape_starts_fresh_with_a_warning():
    """A layer resized after the optimizer was built (an embedding for a larger vocabulary) and put into
    param_groups: it is a new parameter, as torch's optimizers take it. dist8 moved the old state onto
    it, so the step failed ("state1 ... has shape (600,), parameter has (700,)") after that state had
    left the old parameter; a retry then went on fresh, silently. Now: fresh state and one warning
    naming it; a same-shape replacement still carries the state over (the FSDP2 swap)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(600))
    opt = AdamW8bit([("emb.weight", a)], lr=1e-2, min_8bit_size=0)
    a.grad = torch.randn(600)
    opt.step()
    b = torch.nn.Parameter(torch.randn(700))
    opt.param_groups[0]["params"][0] = b
    b.grad = torch.randn(700)
    with pytest.warns(UserWarning, match=r"^dist8: emb\.weight \(600,\) -> \(700,\): replaced in param_groups by a "
                                         r"tensor of another shape; it starts with fresh optimizer state"):
        opt.step()
    assert opt.state[b]["step"] == 1 and a not in opt.state
    c = torch.nn.Parameter(b.detach().clone())  # same shape: the state moves, no warning
    opt.param_groups[0]["params"][0] = c
    c.grad = torch.randn(700)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.state[c]["step"] == 2 and opt.param_name(c) == "emb.weight"


def test_a_model_moved_to_another_device_after_the_first_step_is_refused_naming_the_parameter():
    """``model.to(device)`` in place (swap_tensors; FSDP2's DTensors always move so) after the first
    step left the state on the old device; the native kernels refused the mix without naming the
    parameter ("state1 is on cpu but param is on cuda:0"). Now the step refuses first, naming it and
    the fix, which works (here with ``meta`` standing in for a GPU). Met on a GPU after Lightning,
    whose teardown moves model and state to the CPU after ``fit``: code that then moves only the model."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model = torch.nn.Linear(4, 600)
        opt = AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        model.to("meta")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        with pytest.raises(ValueError, match=r"^parameter weight is on meta but its optimizer state is on cpu \(the "
                                             r"model moved after the optimizer's first step\?\); "
                                             r"opt\.load_state_dict\(opt\.state_dict\(\)\) puts the state"):
            opt.step()
        opt.load_state_dict(opt.state_dict())
        assert {t.device.type for t in opt.state[model.weight].values() if torch.is_tensor(t) and t.dim()} == {"meta"}
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def test_parameters_swapped_after_the_optimizer_was_built_keep_their_marks_and_state():
    """Module.to with swap_tensors after the optimizer exists: torch's optimizers allow it; dist8's held
    weak references to the parameters, which swap_tensors refuses ("Couldn't swap Linear.weight"). Now
    the swap works, a GlobalOptimManager mark it took away comes back, and the run is the run that
    built the optimizer after the swap, bitwise."""
    from dist8.optim import GlobalOptimManager

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.fc = StableEmbedding(300, 16), torch.nn.Linear(16, 300)

        def forward(self, x):
            return self.fc(self.emb(x)).float().square().mean()

    x = torch.randint(0, 300, (4, 8))
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    mng = GlobalOptimManager.get_instance()
    try:
        runs = []
        for built_before in (True, False):
            model = Model()
            mng.register_module_override(model.fc, "weight", {"optim_bits": 32})
            if built_before:
                opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
            model.to(torch.bfloat16)
            if not built_before:
                opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
            for _ in range(2):
                model(x).backward()
                opt.step()
                opt.zero_grad()
            runs.append([p.detach().clone() for p in model.parameters()])
            kinds = {n: opt.state[p]["state1"].dtype for n, p in model.named_parameters()}
            assert kinds["emb.weight"] == kinds["fc.weight"] == torch.float32, kinds
            assert kinds["fc.bias"] == torch.uint8
            mng.initialize()
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        mng.initialize()


@pytest.mark.parametrize("edit", ["remove the first", "reverse", "insert a new one first"])
@pytest.mark.parametrize("named", [True, False])
def test_parameters_moved_within_param_groups_keep_their_own_state(edit, named):
    """Editing ``param_groups[i]["params"]`` by hand (removing a parameter to stop training it, reordering,
    inserting one) moved parameters to positions other ones held, and each took the state and name of the
    one recorded there, as FSDP2's swapped-in parameters do: same-shaped layers trained on their
    neighbours' moments, silently (0.04 off torch's semantics after two steps at lr 1e-2). State stays with
    its parameter now, as torch keys it; the result is the run whose optimizer was built with the edited list."""
    def run(edit_by_hand):
        torch.manual_seed(0)
        layers = [torch.nn.Parameter(torch.randn(64, 64) * 0.1) for _ in range(3)]
        newcomer = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        params = [(f"layer{i}", p) for i, p in enumerate(layers)] if named else layers
        edited = {"remove the first": layers[1:], "reverse": layers[::-1],
                  "insert a new one first": [newcomer, *layers]}[edit]
        opt = AdamW8bit(params, lr=1e-2, min_8bit_size=0)
        gen = torch.Generator().manual_seed(1)
        for step in range(5):
            if step == 2:
                if edit_by_hand:
                    opt.param_groups[0]["params"] = list(edited)
                else:  # the same parameters, their state carried over by object as torch keeps it
                    state = {p: opt.state[p] for p in edited if p in opt.state}
                    opt = AdamW8bit(list(edited), lr=1e-2, min_8bit_size=0)
                    opt.state.update(state)
            for p in (*layers, newcomer):
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in (*layers, newcomer)], opt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_hand, opt = run(True)
    rebuilt, _ = run(False)
    for a, b in zip(by_hand, rebuilt):
        assert torch.equal(a, b)
    assert sorted(opt.state[p]["step"] for p in opt.param_groups[0]["params"]) == (
        [3, 5, 5, 5] if edit.startswith("insert") else [5] * len(opt.param_groups[0]["params"]))
    # a parameter that left the groups had its state freed: said once, naming it (torch keeps such state)
    said = [str(w.message) for w in caught if "left param_groups" in str(w.message)]
    assert said == ([f"dist8: {'layer0' if named else 'group 0 index 0'} (1 parameter) left param_groups: their "
                     "optimizer state is freed, and a parameter put back starts with fresh state (freeze with "
                     "requires_grad_(False) or grad=None to keep it)"] if edit == "remove the first" else []), said


def test_global_numel_mark_decides_8bit():
    shard = torch.nn.Parameter(torch.randn(100))
    shard._dist8_global_numel = 100_000  # a shard of a big parameter
    opt = AdamW8bit([shard])
    _step(opt, [shard])
    assert opt.state[shard]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_param_and_counts(bad):
    """on_nonfinite="skip_param": the whole parameter's step is skipped, counted once."""
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("a", a), ("b", b)], on_nonfinite="skip_param")
    _step(opt, [a, b])
    before = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    a.grad = torch.randn(5000)
    a.grad[17] = bad
    b.grad = torch.randn(5000)
    opt.step()
    assert torch.equal(a, a_before) and opt.state[a]["step"] == 1
    assert all(torch.equal(v, opt.state[a][k]) for k, v in before.items())
    assert not torch.equal(b, b_before)
    assert opt.nonfinite_skips == 1 and opt.last_nonfinite == ["a"]
    assert opt.nonfinite_skips_by_param() == {"a": 1}
    strict = AdamW8bit([("a", a)], on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="'?a'?"):
        strict.step()


def test_on_nonfinite_raise_steps_no_parameter():
    """``on_nonfinite="raise"`` raised at the flagged parameter, after stepping every parameter before it in
    the step's order ("step skipped, state untouched" said the message); it raises before any update now."""
    first, bad = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("first", first), ("bad", bad)], on_nonfinite="raise")
    _step(opt, [first, bad])
    before = {p: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
              for p in (first, bad)}
    first.grad, bad.grad = torch.randn(5000), torch.randn(5000)
    bad.grad[4999] = float("nan")
    with pytest.raises(FloatingPointError, match="^non-finite gradient in parameter bad; step skipped"):
        opt.step()
    for p, (value, state) in before.items():
        assert torch.equal(p, value) and opt.state[p]["step"] == 1
        assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_blocks_by_default(bad):
    """Default on_nonfinite="skip": only the blocks holding an inf/NaN keep their values; counted per block."""
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("a", a), ("b", b)])
    _step(opt, [a, b])
    before = {k: v.clone() for k, v in opt.state[a].items() if torch.is_tensor(v)}
    a_before = a.detach().clone()
    a.grad = torch.randn(5000)
    a.grad[17] = bad  # block 0
    a.grad[4999] = bad  # the last, partial block (4864..4999)
    b.grad = torch.randn(5000)
    opt.step()
    skipped = torch.zeros(5000, dtype=torch.bool)
    skipped[:256] = skipped[4864:] = True
    assert torch.equal(a.detach()[skipped], a_before[skipped])
    assert (a.detach()[~skipped] != a_before[~skipped]).all()
    for key in ("state1", "state2"):
        assert torch.equal(opt.state[a][key][skipped], before[key][skipped]), key
    for key in ("absmax1", "absmax2"):
        assert opt.state[a][key][0] == before[key][0] and opt.state[a][key][-1] == before[key][-1], key
        assert torch.isfinite(opt.state[a][key]).all()
    assert opt.state[a]["step"] == 2
    assert opt.nonfinite_skips == 2 and opt.last_nonfinite == ["a"]
    assert opt.nonfinite_skips_by_param() == {"a": 2}
    opt.step()  # a.grad still holds the inf/NaN: the same two blocks again
    assert opt.nonfinite_skips == 4 and opt.last_nonfinite == ["a"]
    a.grad = torch.randn(5000)
    opt.step()
    assert opt.last_nonfinite == [] and torch.isfinite(a).all()


def test_huge_finite_gradients_never_poison_state():
    """A finite gradient whose square overflows (3e38) skips only its block; 1e19 is updated."""
    p = torch.nn.Parameter(torch.randn(4096))
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = AdamW8bit([p]), torch.optim.AdamW([ref])
    for step in range(4):
        g = torch.randn(4096)
        g[300] = 3e38 if step == 1 else 1e19
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(ref).all()
    for key in ("absmax1", "absmax2"):
        assert torch.isfinite(opt.state[p][key]).all(), key
    assert opt.nonfinite_skips == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_percentile_clipping_takes_finite_gradients_whose_square_norm_overflows_fp32(dtype):
    """|g| ~ 1e30 is finite in fp32 and bf16 but its square norm is not: the step clips it (the norm
    history saturates at fp32's max) instead of raising mid-step, and everything stays finite."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4099).to(dtype))
    opt = AdamW8bit([("p", p)], percentile_clipping=50)
    for step in range(4):
        p.grad = (torch.randn(4099) * (1e30 if step % 2 else 1.0)).to(dtype)
        before = p.detach().clone()
        opt.step()
        assert opt.state[p]["step"] == step + 1
        assert torch.isfinite(p).all() and not torch.equal(p, before), f"step {step}"
    history = opt.state[p]["gnorm_vec"]
    assert torch.isfinite(history).all() and history[1] == torch.finfo(torch.float32).max
    for key in ("absmax1", "absmax2"):
        assert torch.isfinite(opt.state[p][key]).all(), key


@pytest.mark.parametrize("name", ["LAMB8bit", "LAMB32bit", "LARS8bit"])
def test_trust_ratio_beyond_fp32_keeps_parameters_finite(name):
    """Gradients of 1e-40 (subnormal): LAMB's p_norm / u_norm is ~1e40, past fp32's range, and an fp32
    lr * ratio made every parameter inf/NaN after one step. The step is what the rule says: LAMB moves
    by lr * p_norm along the update's direction, whatever its size."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(9000))
    kw = dict(momentum=0.9, lr=1e3) if name.startswith("LARS") else dict(betas=(0.5, 0.999), eps=1.0, lr=0.1)
    opt = getattr(dist8, name)([p], min_8bit_size=0, **kw)
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(9000) * 1e-40
        opt.step()
        assert torch.isfinite(p).all() and opt.nonfinite_skips == 0, step
        if name.startswith("LAMB"):
            moved, expected = (p - before).norm().item(), kw["lr"] * before.norm().item()
            assert abs(moved - expected) < 1e-3 * expected, (step, moved, expected)


def test_percentile_clipping_limits_spikes():
    p = torch.nn.Parameter(torch.zeros(5000))
    q = torch.nn.Parameter(torch.zeros(5000))
    clipped = AdamW8bit([p], percentile_clipping=50, weight_decay=0)
    plain = AdamW8bit([q], weight_decay=0)
    for s in range(10):
        g = torch.randn(5000) * (100.0 if s == 9 else 1.0)
        p.grad, q.grad = g.clone(), g.clone()
        clipped.step()
        plain.step()
    assert clipped.state[p]["gnorm_vec"][9] > 1000 * clipped.state[p]["gnorm_vec"][8]
    assert not torch.equal(p, q)


@pytest.mark.parametrize("cls", [dist8.AdamW8bit, dist8.AdamW32bit])
def test_percentile_clipping_takes_no_sample_from_a_step_without_gradient(cls):
    """An all-zero gradient (zero_grad(set_to_none=False) on a module a step did not use, an MoE expert not routed)
    is not a norm sample: with more than p% of them in the window the p-th percentile was 0 and every real
    gradient was scaled to exactly 0, so the parameter stopped learning. The run equals one given each real
    gradient scaled to the percentile of the real norms before it, without clipping."""
    torch.manual_seed(0)
    grads = [torch.zeros(5000) if s % 10 == 9 or 20 <= s < 30 else torch.randn(5000) * (1 + s % 7) for s in range(60)]
    p, q = torch.nn.Parameter(torch.zeros(5000)), torch.nn.Parameter(torch.zeros(5000))
    clipped, by_hand = cls([p], percentile_clipping=5), cls([q])
    norms = []
    for s, g in enumerate(grads):
        before = p.detach().clone()
        p.grad = g.clone()
        clipped.step()
        scale = 1.0
        if g.any():
            norms.append(float(g.double().pow(2).sum()))
            clip = sorted(norms[-sum(1 for h in grads[max(0, s - 99):s + 1] if h.any()):])[int(0.05 * (len(norms) - 1))]
            scale = min(1.0, (clip / norms[-1]) ** 0.5)
            assert not torch.equal(p, before), f"step {s}: a real gradient was scaled to 0"
        q.grad = g * scale
        by_hand.step()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=f"step {s}")


def test_percentile_clipping_steps_a_gradient_whose_square_norm_is_below_fp32s_range():
    """Its square norm is stored as 0 in the fp32 history, which holds no sample then: the step is not clipped."""
    p = torch.nn.Parameter(torch.zeros(5000))
    opt = dist8.AdamW8bit([p], percentile_clipping=5, weight_decay=0)
    for _ in range(3):
        p.grad = torch.full((5000,), 1e-30)
        opt.step()
    assert bool((p < 0).all()) and float(opt.state[p]["gnorm_vec"].abs().sum()) == 0


def test_lr_scheduler_and_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.ones(5000))
    opt = SGD8bit([p], lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5000
    sched.step()
    snap = p.detach().clone()
    opt.step(closure)
    assert torch.equal(p, snap)  # lr is 0 now
    opt.zero_grad()
    assert p.grad is None


def test_param_groups_have_their_own_hyperparameters():
    a, b = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))
    opt = Lion8bit([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 0.1}])
    _step(opt, [a, b])
    assert torch.equal(a, torch.ones(5000)) and not torch.equal(b, torch.ones(5000))


def test_add_param_group_is_checked_and_stepped():
    a, b = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))
    opt = Lion8bit([a], lr=0.0)
    opt.add_param_group({"params": b, "lr": 0.1})
    _step(opt, [a, b])
    assert torch.equal(a, torch.ones(5000)) and not torch.equal(b, torch.ones(5000))
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "lr": -1.0})
    with pytest.raises(TypeError, match="float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]})
    assert len(opt.param_groups) == groups


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(block_size=100), "block_size"),
        (dict(block_size=32), "block_size"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(optim_bits=4), "optim_bits"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
        (dict(overrides={"x": {"bogus": 1}}), "bogus"),
        (dict(amsgrad=True), "amsgrad"),
        (dict(quant_map="nf4"), "quant_map"),
    ],
)
def test_bad_arguments_raise_value_error_naming_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.randn(10))], **kwargs)


def test_bad_tensors_raise_type_error():
    with pytest.raises(TypeError, match="complex"):
        AdamW8bit([torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float64"):
        AdamW8bit([("w", torch.nn.Parameter(torch.randn(4, dtype=torch.float64)))])
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="weight.*sparse"):
        opt.step()
    with pytest.raises(ValueError, match="momentum"):
        SGD8bit([torch.nn.Parameter(torch.randn(4))], lr=0.1)


def test_a_model_and_an_optimizer_given_in_each_others_place_are_named(tmp_path):
    """Swapped arguments (and a module given as params) failed deep inside with AttributeErrors
    ("'AdamW8bit' object has no attribute 'named_parameters'"), or named a layer as a bad tensor."""
    import dist8.checkpoint as ckpt

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = AdamW8bit(model.parameters())
    swapped = r"must be a torch\.nn\.Module( or None)?, got AdamW8bit \(model and optimizer swapped\?\)$"
    with pytest.raises(TypeError, match=r"^dist8\.checkpoint\.save: model " + swapped):
        ckpt.save(tmp_path / "ck", opt, model)
    with pytest.raises(TypeError, match=r"^dist8\.checkpoint\.load: model " + swapped):
        ckpt.load(tmp_path / "ck", opt, model)
    with pytest.raises(TypeError, match=r"^load_fp32_weights: model " + swapped):
        ckpt.load_fp32_weights({}, opt, model)
    with pytest.raises(TypeError, match=r"^cast_model: model " + swapped):
        dist8.cast_model(opt, torch.bfloat16)
    with pytest.raises(TypeError, match=r"^params is a torch\.nn\.Module \(Sequential\): pass model\.parameters\(\)"):
        AdamW8bit(model)
    assert not (tmp_path / "ck").exists()


def test_unknown_keyword_arguments_name_the_class_and_torchs_switches_get_a_hint():
    """Code written for ``torch.optim.AdamW(fused=True)`` meets a one-line TypeError naming the
    optimizer and what to do; any other unknown keyword is named without the hint."""
    p = [torch.nn.Parameter(torch.randn(10))]
    for flag in ("fused", "foreach", "capturable", "differentiable"):
        with pytest.raises(TypeError, match=rf"^AdamW8bit got unexpected keyword argument\(s\) '{flag}'; "
                                            r"torch\.optim's .*dist8 always runs its own fused kernel: drop them$"):
            AdamW8bit(p, **{flag: True})
    with pytest.raises(TypeError, match=r"^Lion8bit got unexpected keyword argument\(s\) 'learning_rate'$"):
        Lion8bit(p, learning_rate=1e-3)


def test_import_is_light_and_a_first_call_under_torch_compile_stays_eager(tmp_path):
    """torch.compile(opt.step) runs (graph breaks where the step reads host values), equals the
    eager step and warns about nothing (e.g. dynamo tracing into backend loading or cached maps).
    In a fresh process: neither ``import dist8`` nor an optimizer's life (construct, step,
    zero_grad, state_dict, load_state_dict, add_param_group; ShardedOptimizer on a world of 1;
    gradient release; dist8.checkpoint save and load) imports torch._dynamo (about 1 s of every rank's start-up; dist8.kernels.eager,
    dist8.optim.lazy_dynamo), so the compiled step is what makes the process's first backend choice."""
    code = (
        "import sys, torch, torch.distributed as dist, dist8, dist8.checkpoint, dist8.shard, dist8.train.trainer\n"
        "assert 'torch._dynamo' not in sys.modules, 'importing dist8 imported torch._dynamo'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ps = [torch.nn.Parameter(torch.randn(5000, generator=g)) for _ in range(3)]\n"
        "ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]\n"
        "opt, ref_opt = dist8.AdamW8bit(ps, lr=1e-2), dist8.AdamW8bit(ref, lr=1e-2)\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "model = torch.nn.Linear(300, 300)\n"
        "for o in (dist8.Lion8bit(model.parameters()), dist8.shard.ShardedOptimizer(model.named_parameters())):\n"
        "    model(torch.randn(2, 300)).sum().backward(); o.step(); o.zero_grad(); o.load_state_dict(o.state_dict())\n"
        "opt.add_param_group({'params': [torch.nn.Parameter(torch.zeros(3))]})\n"
        "released = torch.nn.Linear(300, 300)\n"
        "ropt = dist8.AdamW8bit(released.parameters())\n"
        "handle = dist8.gradient_release(released, ropt)\n"
        "released(torch.randn(2, 300)).sum().backward(); ropt.step(); ropt.zero_grad(); handle.remove()\n"
        f"dist8.checkpoint.save('{tmp_path / 'ck'}', released, ropt, step=1)\n"
        f"dist8.checkpoint.load('{tmp_path / 'ck'}', released, ropt)\n"
        "assert 'torch._dynamo' not in sys.modules, 'an optimizer method imported torch._dynamo'\n"
        "step = torch.compile(opt.step)\n"
        "for _ in range(3):\n"
        "    for p, r in zip(ps, ref):\n"
        "        p.grad = torch.randn(5000, generator=g); r.grad = p.grad.clone()\n"
        "    step(); ref_opt.step()\n"
        "assert all(torch.equal(p, r) for p, r in zip(ps, ref))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_get_optimizer_class_by_name():
    assert get_optimizer_class("dist8.AdamW8bit") is dist8.AdamW8bit
    assert get_optimizer_class("lion8bit") is dist8.Lion8bit
    with pytest.raises(ValueError, match="AdamW8bit"):
        get_optimizer_class("AdamW9bit")


def test_nonfinite_gradient_leaves_percentile_history_alone():
    """Default per-block skip with percentile clipping: a NaN gradient's norm is not recorded,
    so the parameter keeps training afterwards (a NaN in the history would clip it to NaN forever)."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("p", p)], percentile_clipping=90)
    for step in range(4):
        p.grad = torch.randn(5000)
        if step == 1:
            p.grad[3] = float("nan")
        before = p.detach().clone()
        opt.step()
        changed = (p.detach() != before).sum()
        assert changed >= (5000 - 256 if step == 1 else 5000) - 10, f"step {step}: {int(changed)} values moved"
    assert opt.nonfinite_skips == 1 and torch.isfinite(opt.state[p]["gnorm_vec"]).all()


def test_foreign_state_dicts_name_what_they_are_and_bnb_converts():
    # A newcomer switching libraries mid-run loads the old optimizer's state dict: the error
    # says whose it is and what to do; bitsandbytes' state goes through from_bitsandbytes.
    import bitsandbytes as bnb

    from dist8.checkpoint.convert import from_bitsandbytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.Linear(300, 2))
    model(torch.randn(3, 8)).sum().backward()
    plain = torch.optim.AdamW(model.parameters())
    plain.step()
    with pytest.raises(KeyError, match="a torch.optim state dict"):
        dist8.AdamW8bit(model.parameters(), min_8bit_size=0).load_state_dict(plain.state_dict())
    b = bnb.optim.AdamW8bit(model.parameters(), min_8bit_size=0)
    b.step()
    with pytest.raises(KeyError, match=r"from_bitsandbytes\(state_dict\)"):
        dist8.AdamW8bit(model.parameters(), min_8bit_size=0).load_state_dict(b.state_dict())
    opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
    opt.load_state_dict(from_bitsandbytes(b.state_dict()))
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bits", [8, 32])
def test_state_that_no_longer_fits_its_parameter_is_named(bits):
    # Code that resizes a parameter in place (p.data = a bigger tensor) or changes optim_bits in a
    # group after the first step: one line naming the parameter and the way out, before any kernel
    # runs; `del opt.state[p]` gives fresh state.
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([("emb", p)], optim_bits=bits)
    _step(opt, [p])
    p.data = torch.randn(6000)
    with pytest.raises(ValueError, match=r"^parameter emb has shape \(6000,\) but its optimizer state was made for "
                                         r"\(5000,\) \(resized after its first step\?\); give it fresh state with "
                                         r"del optimizer.state\[param\]"):
        _step(opt, [p])
    del opt.state[p]
    _step(opt, [p])
    assert opt.state[p]["step"] == 1 and opt.state[p]["state1"].shape == (6000,)
    opt.param_groups[0]["optim_bits"] = 40 - bits  # 8 <-> 32
    other = "32" if bits == 8 else "8"
    with pytest.raises(ValueError, match=rf"^parameter emb has {bits}-bit state but its settings now give it "
                                         rf"{other}-bit state"):
        _step(opt, [p])


def test_resized_parameter_under_gradient_release_is_named():
    model = torch.nn.Linear(100, 60)
    opt = AdamW8bit(model.named_parameters(), min_8bit_size=0)
    handle = dist8.gradient_release(model, opt)
    model(torch.randn(2, 100)).sum().backward()
    model.weight.data = torch.randn(60, 101)
    with pytest.raises(ValueError, match=r"parameter weight has shape \(60, 101\) but its optimizer state was made"):
        model(torch.randn(2, 101)).sum().backward()
    handle.remove()


def test_gradient_of_an_unsupported_dtype_is_named():
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    try:
        p.grad.data = torch.randn(5000, dtype=torch.float64)  # past torch's own dtype check (2.6, 2.13)
    except RuntimeError as exc:
        pytest.skip(f"torch {torch.__version__} refuses such a gradient itself, so dist8's check is unreachable: {exc}")
    opt = AdamW8bit([("w", p)])
    with pytest.raises(TypeError, match=r"^parameter w has a torch.float64 gradient; supported: float32, bfloat16"):
        opt.step()
    assert not opt.state[p]


def _fully_shard_after_the_optimizer(rank, world_size, late):
    import warnings

    from torch.distributed.fsdp import fully_shard

    from fsdp_utils import mesh_of

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 300), torch.nn.GELU(), torch.nn.Linear(300, 8))
    if not late:
        fully_shard(model, mesh=mesh_of(world_size))
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    if late:  # the new DTensor parameters are not the optimizer's: it steps nothing
        fully_shard(model, mesh=mesh_of(world_size))
    before = [p.full_tensor().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(4, 32)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    trained = not all(torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters()))
    return trained, [str(w.message) for w in caught if "had a gradient" in str(w.message)]


def test_steps_that_never_find_a_gradient_warn_once(tmp_path):
    """An optimizer built before torch's fully_shard holds parameters backward never reaches: every
    step did nothing, silently (as torch's AdamW does). One step without gradients stays a no-op
    (torch's contract); the second in a row, before any gradient was seen, warns once."""
    import warnings

    from dist_utils import run_ranks

    p = torch.nn.Parameter(torch.randn(300))
    opt = dist8.AdamW8bit([p], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        assert not caught
        opt.step()
        opt.step()
    assert len(caught) == 1 and str(caught[0].message).startswith(
        "dist8: AdamW8bit.step() ran twice and none of its 1 parameters had a gradient either time"), caught
    assert "torch's fully_shard" in str(caught[0].message) and "warn_without_gradients = False" in str(caught[0].message)
    for silenced in (True, False):  # after a gradient was seen, or silenced: no warning
        q = torch.nn.Parameter(torch.randn(300))
        opt = dist8.Lion8bit([q], lr=1e-3)
        if silenced:
            opt.warn_without_gradients = False
        else:
            _step(opt, [q])
            q.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step()
        assert not caught, silenced
    late, early = (run_ranks(_fully_shard_after_the_optimizer, 1, late, tmp_path=tmp_path)[0] for late in (True, False))
    assert late[0] is False and len(late[1]) == 1, late
    assert early == (True, []), early
