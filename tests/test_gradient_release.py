"""dist8.gradient_release: per-parameter steps inside backward, bitwise equal to the normal step.

* every dist8 8-bit rule (and a 32-bit one, percentile clipping, a bf16 model,
  name overrides, two param groups with an LR change), 4 steps: parameters and
  state bitwise equal to ``loss.backward(); opt.step(); opt.zero_grad()``;
* gradients are freed inside backward (no parameter holds one afterwards, and
  at most one is alive when a hook runs);
* ``max_grad_norm_per_param`` equals clipping each gradient, then stepping; an LR scheduler
  (created before or after the handle) drives the released steps as it drives normal ones;
* FSDP2 at 2 gloo ranks: bitwise equal to FSDP2 with the normal step;
* refusals: ShardedOptimizer, DDP, torch optimizers, GradScaler, gradient
  accumulation (both ways), double activation, foreign parameters, stale gradients,
  ``on_nonfinite="raise"`` (at once, or at the first update when set later);
* ``zero_grad()`` after an exception from backward clears what it left, and the loop goes on;
* a ``torch.compile``d training step (plain and chunked) is bitwise the eager one;
* step hooks run once per ``opt.step()`` (an EMA post hook equals the normal steps'); pre hooks warn once;
* ``remove()`` restores the normal step.
"""
import copy
import os
import warnings

import pytest
import torch
from torch import nn

import dist8
from dist8.optim import AdamW8bit, Lion8bit
from dist_utils import run_ranks
from optim_cases import CASES

os.environ.setdefault("OMP_NUM_THREADS", "1")


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Embedding(64, 48)
        self.fc1 = nn.Linear(48, 160)
        self.ln = nn.LayerNorm(160)
        self.fc2 = nn.Linear(160, 64)
        self.to(dtype)

    def forward(self, x):
        return self.fc2(self.ln(torch.relu(self.fc1(self.emb(x)))))


def make(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Net(dtype)


def loss_of(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, 64, (16,), generator=gen)
    return nn.functional.cross_entropy(model(x).float(), (5 * x + 3) % 64)


def train(model, opt, steps, release=False, **release_kw):
    handle = dist8.gradient_release(model, opt, **release_kw) if release else None
    for s in range(steps):
        loss_of(model, s).backward()
        opt.step()
        opt.zero_grad()
    if handle is not None:
        handle.remove()
    return model


def twin_runs():
    """(model, optimizer) twice over, identical: AdamW8bit, 8-bit state for the big matrices."""
    ref_model, model = make(), make()
    return (ref_model, AdamW8bit(ref_model.parameters(), lr=1e-2, min_8bit_size=1000),
            model, AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1000))


def assert_same(m1, o1, m2, o2):
    # two runs that did not train would be equal too: the first one stepped every parameter
    assert all(o1.state[p].get("step", 0) for g in o1.param_groups for p in g["params"]), "a parameter never stepped"
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), f"parameter {n} differs"
    p1 = [p for g in o1.param_groups for p in g["params"]]
    p2 = [p for g in o2.param_groups for p in g["params"]]
    for a, b in zip(p1, p2):
        s1, s2 = o1.state[a], o2.state[b]
        assert s1.keys() == s2.keys()
        for k in s1:
            if isinstance(s1[k], torch.Tensor):
                assert torch.equal(s1[k], s2[k]), f"{o1.param_name(a)}.{k} differs"
            else:
                assert s1[k] == s2[k]


@pytest.mark.parametrize("name", list(CASES))
def test_release_equals_normal_step_bitwise(name):
    cls, kw, _, _ = CASES[name]
    kw = dict(kw, min_8bit_size=1000)  # the 8-bit path for the big matrices, 32-bit for biases
    if name in ("Adam", "LAMB"):
        kw["percentile_clipping"] = 90  # a per-parameter gradient-norm history
    if name in ("AdamW", "Lion"):
        kw["maximize"] = True  # the released step's kernel scalars carry the sign too
    ref_model, rel_model = make(), make()
    ref_opt = cls(ref_model.named_parameters(), **kw)
    rel_opt = cls(rel_model.named_parameters(), **kw)
    train(ref_model, ref_opt, 4)
    train(rel_model, rel_opt, 4, release=True)
    assert_same(ref_model, ref_opt, rel_model, rel_opt)
    assert all(p.grad is None for p in rel_model.parameters())


@pytest.mark.parametrize("chunked", [False, True])
def test_release_survives_a_swap_of_the_parameters(chunked):
    """Module.to with swap_tensors (every FSDP2 model; any under set_swap_module_params_on_conversion)
    gives each parameter a new C++ tensor without its post-accumulate-grad hook: the release stopped
    stepping, silently (opt.step() is a no-op). It hooks them again at the next forward; the run with a
    swap after 2 steps is bitwise the normal run with the same swap."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        (ref_model, ref_opt, model, opt) = twin_runs()
        handle = dist8.gradient_release(model, opt, weight_grad_chunk=512 if chunked else None)
        for m, o in ((ref_model, ref_opt), (model, opt)):
            for s in range(4):
                if s == 2:
                    weight = m.fc1.weight
                    m.to(torch.bfloat16)
                    assert m.fc1.weight is weight  # swapped, not replaced
                loss_of(m, s).backward()
                o.step()
                o.zero_grad()
        assert handle.steps == 4 * len(list(model.parameters())) or chunked
        handle.remove()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert_same(ref_model, ref_opt, model, opt)
    assert all(p.grad is None for p in model.parameters())


def test_release_bf16_overrides_groups_and_32bit_state():
    def build(model):
        decay = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
        other = [(n, p) for n, p in model.named_parameters() if p.dim() <= 1]
        return AdamW8bit([{"params": decay}, {"params": other, "weight_decay": 0.0, "lr": 3e-3}], lr=1e-2,
                         min_8bit_size=1000, overrides={"fc2.*": {"optim_bits": 32}})

    ref_model, rel_model = make(dtype=torch.bfloat16), make(dtype=torch.bfloat16)
    ref_opt, rel_opt = build(ref_model), build(rel_model)
    handle = dist8.gradient_release(rel_model, rel_opt)
    for s in range(4):
        for opt in (ref_opt, rel_opt):  # an LR schedule changes the group between steps
            opt.param_groups[0]["lr"] = 1e-2 * (0.5 ** s)
        loss_of(ref_model, s).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        loss_of(rel_model, s).backward()
    handle.remove()
    assert handle.steps == 4 * len(list(rel_model.parameters()))
    assert rel_opt.state[rel_model.fc2.weight]["state1"].dtype == torch.float32
    assert_same(ref_model, ref_opt, rel_model, rel_opt)


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_lr_scheduler_drives_the_released_steps(scheduler_first):
    ref_model, ref_opt, rel_model, rel_opt = twin_runs()
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 0.5 ** s)
    if scheduler_first:
        rel_sched = torch.optim.lr_scheduler.LambdaLR(rel_opt, lambda s: 0.5 ** s)
        handle = dist8.gradient_release(rel_model, rel_opt)
    else:
        handle = dist8.gradient_release(rel_model, rel_opt)
        rel_sched = torch.optim.lr_scheduler.LambdaLR(rel_opt, lambda s: 0.5 ** s)
    for s in range(3):
        for model, opt, sched in ((ref_model, ref_opt, ref_sched), (rel_model, rel_opt, rel_sched)):
            loss_of(model, s).backward()
            opt.step()
            opt.zero_grad()
            with warnings.catch_warnings():
                # torch checks at the scheduler's first step that optimizer.step is still its wrapper and
                # was called first; the release installed after the scheduler keeps both true (HF Trainer
                # and Lightning make their schedulers before a callback can install the release)
                warnings.simplefilter("error")
                sched.step()
    handle.remove()
    assert_same(ref_model, ref_opt, rel_model, rel_opt)


def test_gradients_are_freed_inside_backward():
    model = make()
    opt = Lion8bit(model.parameters(), lr=1e-3)
    alive = []

    def count(_p):  # registered after gradient_release's hook: runs after the step and the release
        alive.append(sum(q.grad is not None for q in model.parameters()))

    dist8.gradient_release(model, opt)
    hooks = [p.register_post_accumulate_grad_hook(count) for p in model.parameters()]
    loss_of(model, 0).backward()
    for h in hooks:
        h.remove()
    assert alive == [0] * len(list(model.parameters()))


def test_per_parameter_clip_equals_clip_then_step():
    ref_model, ref_opt, rel_model, rel_opt = twin_runs()
    for s in range(3):
        loss_of(ref_model, s).backward()
        for p in ref_model.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
    train(rel_model, rel_opt, 3, release=True, max_grad_norm_per_param=0.05)
    assert_same(ref_model, ref_opt, rel_model, rel_opt)


def test_remove_restores_normal_step():
    model = make()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    handle = dist8.gradient_release(model, opt)
    handle.remove()
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook released them
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    with dist8.gradient_release(model, opt.__class__(model.parameters())) as h2:
        assert h2.active
    assert not h2.active


def test_step_params_is_the_public_per_parameter_step():
    ref_model, ref_opt, model, opt = twin_runs()
    for s in range(2):
        loss_of(ref_model, s).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        loss_of(model, s).backward()
        for p in reversed(list(model.parameters())):
            opt.step_params([p])
        opt.zero_grad()
    assert_same(ref_model, ref_opt, model, opt)
    with pytest.raises(ValueError, match="step_params: parameter .* is not in this optimizer"):
        opt.step_params([nn.Parameter(torch.zeros(3))])


# ---- refusals -------------------------------------------------------------------------------------------
def test_refuses_sharded_optimizer_and_torch_optimizers():
    model = make()
    sharded = dist8.ShardedOptimizer(model.named_parameters(), AdamW8bit, lr=1e-3)
    with pytest.raises(TypeError, match="ShardedOptimizer.*flat gradient buffer"):
        dist8.gradient_release(model, sharded)
    with pytest.raises(TypeError, match="needs a dist8 optimizer.*AdamW"):
        dist8.gradient_release(model, torch.optim.AdamW(model.parameters()))


def test_refuses_ddp(tmp_path):
    run_ranks(_ddp_worker, 1, tmp_path=tmp_path)


def _ddp_worker(rank, world_size):
    model = nn.parallel.DistributedDataParallel(make())
    opt = AdamW8bit(model.parameters())
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        dist8.gradient_release(model, opt)
    # Wrapped after the release (or the release put on accelerate's unwrapped model): the hooks would
    # step with the local gradient, and the ranks drift apart silently. Refused in the forward.
    inner = make()
    opt = AdamW8bit(inner.parameters(), min_8bit_size=0)
    handle = dist8.gradient_release(inner, opt)
    wrapped = nn.parallel.DistributedDataParallel(inner)
    before = [p.detach().clone() for p in inner.parameters()]
    with pytest.raises(RuntimeError, match=r"inside DistributedDataParallel.*parameter emb\.weight.*Nothing was stepped"):
        loss_of(wrapped, 0)
    assert all(torch.equal(b, p) for b, p in zip(before, inner.parameters()))
    handle.remove()  # then DDP trains with the normal step
    loss_of(wrapped, 0).backward()
    opt.step()
    assert not torch.equal(before[0], inner.emb.weight)
    return True


def test_refuses_bad_setup():
    model = make()
    opt = AdamW8bit(model.parameters())
    for bad in (0, -1.0, float("nan"), "1", True):  # True passed as 1.0
        with pytest.raises(ValueError, match="max_grad_norm_per_param must be a number > 0 or None"):
            dist8.gradient_release(model, opt, max_grad_norm_per_param=bad)
    other = make(1)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        dist8.gradient_release(other, opt)
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="still holds a gradient"):
        dist8.gradient_release(model, opt)
    model.zero_grad(set_to_none=True)
    handle = dist8.gradient_release(model, opt)
    with pytest.raises(RuntimeError, match="already active"):
        dist8.gradient_release(model, opt)
    # a second optimizer over a released parameter would never see its gradient (the first hook frees it)
    second = AdamW8bit(list(model.named_parameters())[-1:])
    with pytest.raises(RuntimeError, match=r"^parameter \S+ is already released by another optimizer's "):
        dist8.gradient_release(model, second)
    handle.remove()
    dist8.gradient_release(model, second).remove()  # free again once the first handle is removed


def test_refuses_grad_scaler():
    model = make()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    dist8.gradient_release(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_of(model, 0)).backward()
    with pytest.raises(RuntimeError, match="incompatible with torch.amp.GradScaler"):
        scaler.step(opt)


def test_refuses_scaler_amp_unscale_at_once():
    """With amp_unscale="scaler" the scaler would not tell step() anything: refused before any hook exists."""
    model = make()
    opt = AdamW8bit(model.parameters(), lr=1e-2, amp_unscale="scaler")
    with pytest.raises(ValueError, match="gradient_release does not support amp_unscale='scaler'"):
        dist8.gradient_release(model, opt)
    loss_of(model, 0).backward()  # no hook: the gradients stay for a normal step
    assert all(p.grad is not None for p in model.parameters())


def test_refuses_gradient_accumulation_before_updating():
    model = make()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    dist8.gradient_release(model, opt)
    loss_of(model, 0).backward()
    opt.step()  # the loop calls step(): from now on a second backward before step() is refused
    loss_of(model, 1).backward()
    snapshot = [p.detach().clone() for p in model.parameters()]
    steps = [st["step"] for st in opt.state.values()]
    with pytest.raises(RuntimeError, match="gradient accumulation is incompatible"):
        loss_of(model, 2).backward()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))  # nothing updated
    assert steps == [st["step"] for st in opt.state.values()]


@pytest.mark.parametrize("key,value", [("optim_bits", 32), ("percentile_clipping", 5)])
def test_a_settings_change_the_state_cannot_follow_is_refused_in_the_forward(key, value):
    """Set after the first step (override_config), it was refused by the backward's hook at that parameter,
    with the parameters before it in backward order already stepped; now in the forward, before any."""
    mng = dist8.GlobalOptimManager.get_instance()
    try:
        model = make()
        opt = AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0)
        dist8.gradient_release(model, opt)
        loss_of(model, 0).backward()
        first = next(iter(model.parameters()))  # stepped last in backward order: the others went first
        mng.override_config(first, key, value)
        snapshot = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=rf"^parameter {next(iter(dict(model.named_parameters())))} has "):
            loss_of(model, 1)
        assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))  # nothing updated
        mng.override_config(first, key, {"optim_bits": 8, "percentile_clipping": 100}[key])  # taken back
        loss_of(model, 1).backward()
        assert not torch.equal(snapshot[0], first)
    finally:
        mng.initialize()


@pytest.mark.parametrize("key,value,match", [("lr", -1.0, r"lr must be >= 0\.0 \(param group 0\), got -1\.0"),
                                             ("betas", (0.9,), r"betas must be a pair"),
                                             ("eps", float("nan"), r"eps must be a finite number")])
def test_a_group_value_the_step_refuses_is_refused_in_the_forward(key, value, match):
    """A param group's value edited after the first step to one the step refuses was refused by the hook of
    that group's first parameter in backward order, with other groups' parameters before it stepped (found by
    a random lifecycle probe: group 0 holds the first layers, stepped last); now in the forward, before any."""
    model = make()
    opt = AdamW8bit([{"params": [model.emb.weight, *model.fc1.parameters()]},
                     {"params": [*model.ln.parameters(), *model.fc2.parameters()]}], lr=1e-2, min_8bit_size=0)
    handle = dist8.gradient_release(model, opt)
    loss_of(model, 0).backward()
    opt.param_groups[0][key] = value
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^{match}"):
        loss_of(model, 1)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))  # nothing updated
    opt.param_groups[0][key] = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}[key]  # taken back
    loss_of(model, 1).backward()
    assert all(not torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))
    handle.remove()


def test_refuses_accumulation_at_step():
    model = make()
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    dist8.gradient_release(model, opt)
    loss_of(model, 0).backward()
    loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match="several backward passes"):
        opt.step()


class _SharedBlock(nn.Module):
    """One Linear run three times per forward (ALBERT-style sharing), optionally under activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.head = nn.Linear(16, 16), nn.Linear(16, 1)
        self.reentrant: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for _ in range(3):
            layer = lambda t: torch.tanh(self.shared(t))  # noqa: E731
            x = layer(x) if self.reentrant is None else checkpoint(layer, x, use_reentrant=self.reentrant)
        return self.head(x).sum()


def test_reentrant_checkpointing_of_a_shared_module_is_refused_at_its_second_partial_gradient():
    """Each reentrant checkpoint runs a backward of its own, so the shared Linear's hook fired three times per
    backward, stepping it with three partial gradients (silently, in a loop that does not call step())."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()  # reentrant needs one
    torch.manual_seed(0)
    ref = _SharedBlock()
    models = {"plain": ref}
    for mode in (False, True):
        models[mode] = copy.deepcopy(ref)
        models[mode].reentrant = mode
    opts = {k: AdamW8bit(m.named_parameters(), lr=1e-2, min_8bit_size=0) for k, m in models.items()}
    for k in (False, True):
        dist8.gradient_release(models[k], opts[k])
    for _ in range(2):
        models["plain"](x).backward()
        opts["plain"].step()
        opts["plain"].zero_grad()
        models[False](x).backward()  # non-reentrant: one accumulated gradient, bitwise the normal step
    for a, b in zip(models["plain"].parameters(), models[False].parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"parameter shared\.(weight|bias) got a second gradient from one forward pass "
                                           r".*Use use_reentrant=False"):
        models[True](x).backward()
    assert opts[True].state[models[True].shared.weight]["step"] == 1  # the first partial only


def test_a_second_backward_of_one_forward_is_refused_at_once_and_submodule_calls_are_not_counted():
    model = make()
    opt = AdamW8bit(model.named_parameters(), lr=1e-2)
    dist8.gradient_release(model, opt)
    loss = loss_of(model, 0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="got a second gradient from one forward pass"):
        loss.backward()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    opt = AdamW8bit(other.named_parameters(), lr=1e-2)
    dist8.gradient_release(other, opt)
    for _ in range(3):  # the model itself never runs (only its layers): no forward is counted, nothing refused
        other[1](other[0](torch.ones(2, 8))).sum().backward()
    assert all(st["step"] == 3 for st in opt.state.values())


# ---- FSDP2 --------------------------------------------------------------------------------------------
def _late_params_run(release, how, chunk=None):
    """4 steps of AdamW8bit where fc2 joins at step 1: added with add_param_group (having got gradients at
    step 0, as a trainable module outside the optimizer does) or unfrozen; "submodules": the model itself is
    never called (its forward pre-hook never runs), only its submodules."""
    model = make()
    if how == "unfreeze":
        model.fc2.requires_grad_(False)
    late = list(model.fc2.parameters())
    first = [p for p in model.parameters() if all(p is not q for q in late)]
    opt = AdamW8bit(model.parameters() if how == "unfreeze" else first, lr=1e-2, min_8bit_size=1000)
    handle = dist8.gradient_release(model, opt, weight_grad_chunk=chunk) if release else None
    for s in range(4):
        if s == 1:
            if how == "unfreeze":
                model.fc2.requires_grad_(True)
            else:
                opt.add_param_group({"params": late})
        if how == "submodules":
            gen = torch.Generator().manual_seed(100 + s)
            x = torch.randint(0, 64, (16,), generator=gen)
            h = model.fc2(model.ln(torch.relu(model.fc1(model.emb(x)))))
            nn.functional.cross_entropy(h, (5 * x + 3) % 64).backward()
        else:
            loss_of(model, s).backward()
        opt.step()
        opt.zero_grad()
    return model, opt, handle


@pytest.mark.parametrize("how,chunk", [("add_group", None), ("add_group", 4096), ("unfreeze", None),
                                       ("unfreeze", 4096), ("submodules", None)])
def test_parameters_that_become_trainable_after_the_release_are_stepped_as_by_the_normal_step(how, chunk):
    """The release hooked only the trainable parameters of the optimizer when it was installed: a group
    added later (Lightning's BackboneFinetuning adds one) or a parameter unfrozen later was never stepped
    (``optimizer.step()`` is a no-op) and its gradient grew, silently (found by an audit: the added layer
    moved 0.000 where the normal step moved it 0.189). Hooked at the next forward of the model now, or
    stepped by the no-op ``optimizer.step()`` when the model itself is never called: bitwise the normal
    step, a gradient held from before summed as the normal step sums it."""
    ref_model, ref_opt, _ = _late_params_run(False, how)
    model, opt, handle = _late_params_run(True, how, chunk)
    assert_same(ref_model, ref_opt, model, opt)
    assert all(p.grad is None for p in model.parameters())
    if chunk is not None:  # hooked whole, not in chunks; the reason says so
        assert "fc2" not in handle.chunks.chunked and "fc1" in handle.chunks.chunked
        if how == "unfreeze":
            assert handle.chunks.unchunked["fc2"].startswith("its weight became trainable after gradient_release")
    handle.remove()


def _fsdp_late_worker(rank, world_size, how):
    import faulthandler

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the test instead of stalling CI
    mesh = init_device_mesh("cpu", (world_size,))
    out = []
    for release in (False, True):
        model = make()
        if how == "unfreeze":
            model.fc2.requires_grad_(False)
        for m in (model.fc1, model.fc2):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        late = list(model.fc2.parameters())
        first = [p for p in model.parameters() if all(p is not q for q in late)]
        opt = AdamW8bit(model.parameters() if how == "unfreeze" else first, lr=1e-2, min_8bit_size=1000)
        handle = dist8.gradient_release(model, opt) if release else None
        for s in range(3):
            if s == 1:
                model.fc2.requires_grad_(True) if how == "unfreeze" else opt.add_param_group({"params": late})
            gen = torch.Generator().manual_seed(10 * s + rank)  # a different batch per rank
            x = torch.randint(0, 64, (16,), generator=gen)
            nn.functional.cross_entropy(model(x), (5 * x + 3) % 64).backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        out.append({n: p.full_tensor().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("how", ["add_group", "unfreeze"])
def test_fsdp2_parameters_that_become_trainable_after_the_release_are_stepped(tmp_path, how):
    """As above under FSDP2 (2 ranks): the late parameters' shards are hooked at the next forward and
    stepped after their reduce-scatter, bitwise the normal step (measured before: 0.212 moved vs 0)."""
    start = {n: p.detach().clone() for n, p in make().named_parameters()}
    for normal, released in run_ranks(_fsdp_late_worker, 2, how, tmp_path=tmp_path):
        assert not torch.equal(normal["fc2.weight"], start["fc2.weight"])
        for n in normal:
            assert torch.equal(normal[n], released[n]), f"{how}: {n} differs"


def _fsdp_worker(rank, world_size, opt_name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cls, kw, _, _ = CASES[opt_name]
    kw = dict(kw, min_8bit_size=1000)
    mesh = init_device_mesh("cpu", (world_size,))
    out = []
    # accumulate=2: FSDP2's own accumulation (set_requires_gradient_sync(False) on all but the last
    # micro-batch) keeps the unsharded gradients and reduce-scatters once, so the sharded parameters'
    # hooks run once per step: the release is exact there, unlike a plain model's accumulation (refused).
    for accumulate in (1, 2):
        for release in (False, True):
            model = make()
            for m in (model.fc1, model.fc2):
                fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = cls(model.named_parameters(), **kw)
            handle = dist8.gradient_release(model, opt) if release else None
            for s in range(3):
                for micro in range(accumulate):
                    model.set_requires_gradient_sync(micro == accumulate - 1)
                    gen = torch.Generator().manual_seed(10 * s + 3 * micro + rank)  # a different batch per rank
                    x = torch.randint(0, 64, (16,), generator=gen)
                    nn.functional.cross_entropy(model(x), (5 * x + 3) % 64).backward()
                if release:
                    assert all(p.grad is None for p in model.parameters())
                    assert handle.steps == (s + 1) * len(list(model.parameters()))  # once per step
                opt.step()
                opt.zero_grad()
            if handle is not None:
                handle.remove()
            out.append({n: p.full_tensor().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("opt_name", ["AdamW", "LAMB"])
def test_fsdp2_release_equals_normal_step(tmp_path, opt_name):
    for normal, released, normal_accumulated, released_accumulated in run_ranks(_fsdp_worker, 2, opt_name,
                                                                                tmp_path=tmp_path):
        for n in normal:
            assert torch.equal(normal[n], released[n]), f"{opt_name}: {n} differs"
            assert torch.equal(normal_accumulated[n], released_accumulated[n]), f"{opt_name}, accumulated: {n} differs"
            assert not torch.equal(normal[n], normal_accumulated[n])  # the second micro-batch counted


# ---- on_nonfinite="raise", zero_grad after a failed backward, torch.compile, step hooks --------------------
def test_on_nonfinite_raise_is_refused_at_once_and_when_set_later():
    """Raised inside backward at one parameter, the others were stepped already and the refused gradient
    stayed: every later batch failed with a misleading accumulation error."""
    model = make()
    with pytest.raises(ValueError, match=r"gradient_release does not support on_nonfinite='raise'.*'skip_param'"):
        dist8.gradient_release(model, AdamW8bit(model.parameters(), on_nonfinite="raise"))
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # nothing installed
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    dist8.gradient_release(model, opt)
    opt.on_nonfinite = "raise"  # after the release: refused at the first update, before it
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="on_nonfinite='raise'"):
        loss_of(model, 0).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_after_an_exception_from_backward_lets_the_loop_go_on(set_to_none):
    """A backward that fails half-way has stepped some parameters and left gradients on others. zero_grad()
    was a no-op: the gradients stayed and every later batch was refused as gradient accumulation."""
    model = make()
    opt = AdamW8bit(model.named_parameters(), lr=1e-2)
    fail = {"now": False}

    def maybe_fail(p):
        if fail["now"]:
            raise RuntimeError("failed in backward")

    # runs before the release's hook (registered first): fc1.weight keeps its gradient, fc2 and the norm
    # were stepped before it, the embedding is not reached
    model.fc1.weight.register_post_accumulate_grad_hook(maybe_fail)
    dist8.gradient_release(model, opt)
    for step in range(4):
        fail["now"] = step == 1
        try:
            loss_of(model, step).backward()
            opt.step()
        except RuntimeError as e:
            assert "failed in backward" in str(e) and step == 1
            assert model.fc1.weight.grad is not None  # left by the failure
        opt.zero_grad(set_to_none=set_to_none)
        for p in model.parameters():
            assert p.grad is None if set_to_none else (p.grad is None or not p.grad.any())
    steps = {opt.param_name(p): st["step"] for p, st in opt.state.items()}
    assert steps["fc2.weight"] == 4 and steps["fc1.weight"] == 3 and steps["emb.weight"] == 3
    loss_of(model, 4).backward()  # accumulation is still refused: no step() or zero_grad() between backwards
    with pytest.raises(RuntimeError, match="gradient accumulation is incompatible"):
        loss_of(model, 5).backward()


def _compiled_release_run(compiled, chunk):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    handle = dist8.gradient_release(model, opt, weight_grad_chunk=chunk)
    assert chunk is None or handle.chunks.chunked == ["0", "2"]

    def train_step(x):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    run = torch.compile(train_step, backend="eager") if compiled else train_step
    for s in range(3):
        run(torch.randn(8, 16, generator=torch.Generator().manual_seed(s)))
    handle.remove()
    return model, opt


@pytest.mark.parametrize("chunk", [None, 256])
def test_a_compiled_training_step_with_release_is_the_eager_one(chunk):
    """torch.compile of a step that calls backward() traced the release hook's update (and the chunked weight
    step) and lost optimizer state, silently: the hooks run eagerly now, bitwise the eager run."""
    torch._dynamo.reset()
    try:
        eager, compiled = _compiled_release_run(False, chunk), _compiled_release_run(True, chunk)
    finally:
        torch._dynamo.reset()
    assert len(compiled[1].state) == len(eager[1].state) == 4
    assert_same(*eager, *compiled)


class _EMA:
    """An exponential moving average of the weights, kept by an optimizer step post hook."""

    def __init__(self, model, decay=0.9):
        self.model, self.decay = model, decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    def __call__(self, opt, args, kwargs):
        with torch.no_grad():
            for s, p in zip(self.shadow, self.model.parameters()):
                s.lerp_(p, 1 - self.decay)


def test_step_hooks_run_once_per_step_and_an_ema_post_hook_equals_the_normal_steps():
    """The released optimizer.step() ran no step hook (an EMA post hook never updated, silently). Now pre
    hooks run at its start and post hooks at its end, when every parameter has been stepped."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    ref_model, ref_opt, model, opt = twin_runs()
    ref_ema, ema = _EMA(ref_model), _EMA(model)
    ref_opt.register_step_post_hook(ref_ema)
    opt.register_step_post_hook(ema)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    def log_global(what):
        return lambda o, a, k: calls.append(what) if o is opt else None

    global_hooks = [register_optimizer_step_pre_hook(log_global("global pre")),
                    register_optimizer_step_post_hook(log_global("global post"))]
    try:
        train(ref_model, ref_opt, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, opt, 4, release=True)
    finally:
        for h in global_hooks:
            h.remove()
    assert_same(ref_model, ref_opt, model, opt)
    for a, b in zip(ref_ema.shadow, ema.shadow):
        assert torch.equal(a, b)
    assert not torch.equal(ema.shadow[0], model.emb.weight)  # the EMA moved, and lags the weights
    assert calls == ["global pre", "pre", "post", "global post"] * 4  # torch's order, once per step
    pre_warnings = [w for w in caught if "step pre hooks" in str(w.message)]
    assert len(pre_warnings) == 1 and "cannot change the update" in str(pre_warnings[0].message)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # DCP in one process
def test_a_resume_through_torch_dcp_under_release_loads_the_state(tmp_path):
    """torch's get_optimizer_state_dict builds the template dcp.load fills by stepping an optimizer without
    state on zero gradients set by hand (lr 0). Under gradient release that step was the no-op one: the
    template was empty, DCP loaded nothing into it, and the resumed run restarted its moments, silently
    (Lightning's ModelParallelStrategy installs the release callback before it restores a checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = make()
    opt = AdamW8bit(model.named_parameters(), lr=1e-2)
    handle = dist8.gradient_release(model, opt)
    for s in range(2):
        loss_of(model, s).backward()
        opt.step()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "ckpt"))
    weights = copy.deepcopy(model.state_dict())
    loss_of(model, 2).backward()
    opt.step()
    handle.remove()

    resumed = make(seed=1)
    resumed.load_state_dict(weights)
    opt2 = AdamW8bit(resumed.named_parameters(), lr=1e-2)
    handle2 = dist8.gradient_release(resumed, opt2)  # before the load, as Lightning's callback is
    template = {"optim": get_optimizer_state_dict(resumed, opt2)}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    set_optimizer_state_dict(resumed, opt2, template["optim"])
    assert len(opt2.state) == len(opt.state) and all(int(st["step"]) == 2 for st in opt2.state.values())
    loss_of(resumed, 2).backward()
    opt2.step()
    handle2.remove()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
