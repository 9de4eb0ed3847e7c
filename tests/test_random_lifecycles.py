"""Seeded random optimizer lifecycles: what users do between steps, held to equalities that must hold.

``tests/test_random_configs.py`` draws configurations and steps them; this file draws what happens
around the steps, in random order: steps with gradients on some parameters (zero rows, a NaN), edits
of param-group values (valid ones, and invalid ones -- a NaN eps, one beta, a negative lr), settings
the state depends on changed late (``optim_bits``, ``min_8bit_size``, ``percentile_clipping``),
``add_param_group`` (also of a parameter already listed), ``GlobalOptimManager`` overrides set late,
``zero_grad``, freezing, ``del optimizer.state[p]`` (the way out the refusals name), a parameter's
``.data`` replaced by another shape, reads of ``optimizer.state[p]`` before ``p``'s first step, and
state-dict round trips through ``torch.load(weights_only=True)``. Four runs take each sequence:

* the C++ kernels and the pure-torch reference: the same outcome (ok, or the same one-line error)
  and bitwise the same parameters and state after every operation;
* a run whose optimizer is rebuilt from its own state dict after every step: bitwise the same;
* a run stepping through ``step_params`` (what gradient release calls), parameters in reverse order:
  bitwise the same, and refused when the step is. Where ``step()`` refuses a param group whose
  parameters have no gradient (it checks every group; ``step_params`` the groups it steps), that run is
  left out from there on.

A refusal must change nothing, which the comparisons check: the runs go on from the same values. A second
test runs such sequences through a model's backward, under ``dist8.gradient_release`` and without.
Found: a state dict holding an entry read before its parameter's first step (``{}``, as torch's
``defaultdict`` makes) could not be loaded back (KeyError), by any load path; ``state_dict()`` raised a bare
``KeyError: <id>`` for an entry of a tensor no group lists; a save between a ``master_weight_bits`` change
and the next step could not be loaded; under gradient release an invalid group value was refused after
other groups' parameters were stepped, and a frozen parameter's unfit state was refused though nothing
would step it. ``DIST8_RANDOM_SEED=n`` draws another set.
"""
import io
import os
import random

import pytest
import torch

import dist8

SEED = int(os.environ.get("DIST8_RANDOM_SEED", "0"))
CASES = 100
OPS = 12
CLASSES = ["AdamW8bit", "Adam8bit", "Lion8bit", "SGD8bit", "RMSprop8bit", "Adagrad8bit", "LAMB8bit", "LARS8bit",
           "AdEMAMix8bit"]
SIZES = (700, 300, 5000)  # built with the optimizer
EXTRA_SIZES = (1100, 33)  # added by add_param_group
# refusals a rebuilt optimizer makes at load time for state the live one keeps until the parameter's
# next step (which refuses it too): the state was made for another shape or kind
LOAD_REFUSES_UNFIT = ("optim_bits, min_8bit_size or overrides differ", "has shape", "percentile")


def _same(a, b) -> bool:
    if not torch.is_tensor(a):
        return a == b
    if not torch.is_tensor(b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool((a == b).logical_or(a.isnan() & b.isnan()).all()) if a.is_floating_point() else torch.equal(a, b)


class Run:
    """One optimizer over its own copies of the case's parameters, on one kernel backend."""

    def __init__(self, case: "Case", backend: str, rebuild: bool = False, split: bool = False) -> None:
        gen = torch.Generator().manual_seed(case.index)
        self.case, self.backend, self.rebuild, self.split = case, backend, rebuild, split
        self.params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(case.dtype)) for n in SIZES]
        self.extra = [torch.nn.Parameter(torch.randn(n, generator=gen).to(case.dtype)) for n in EXTRA_SIZES]
        self.opt = self._built([{"params": self.params}])

    def _built(self, groups):
        os.environ["DIST8_BACKEND"] = self.backend
        return getattr(dist8, self.case.name)(groups, **self.case.kw)

    def apply(self, op: str, *args) -> str:
        """Run one operation; "ok" or the one-line error it raised."""
        os.environ["DIST8_BACKEND"] = self.backend
        try:
            getattr(self, op)(*args)
            return "ok"
        except (ValueError, TypeError, KeyError) as exc:
            message = str(exc)
            assert "\n" not in message, message
            return f"{type(exc).__name__}: {message}"

    def step(self, grads: dict[int, torch.Tensor]) -> None:
        for p in self.params + self.extra:
            g = grads.get(p.numel())
            p.grad = None if g is None or not p.requires_grad else g.to(p.dtype).clone()
        if self.split:
            listed = [p for group in self.opt.param_groups for p in group["params"] if p.grad is not None]
            self.opt.step_params(listed[::-1])
        else:
            self.opt.step()
        if self.rebuild:
            outcome = self.apply("round_trip")
            assert outcome == "ok" or any(s in outcome for s in LOAD_REFUSES_UNFIT), outcome

    def round_trip(self) -> None:
        buffer = io.BytesIO()
        torch.save(self.opt.state_dict(), buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        rebuilt = self._built([{"params": group["params"]} for group in self.opt.param_groups])
        rebuilt.load_state_dict(saved)  # a refusal keeps the old optimizer, as a failed resume would
        self.opt = rebuilt

    def edit(self, gi: int, key: str, value) -> None:
        self.opt.param_groups[gi % len(self.opt.param_groups)][key] = value

    def add(self, i: int, values: dict) -> None:
        self.opt.add_param_group({"params": [self.extra[i]], **values})

    def zero(self, set_to_none: bool) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def freeze(self, i: int, requires_grad: bool) -> None:
        self.params[i].requires_grad_(requires_grad)

    def forget(self, i: int) -> None:
        everything = self.params + self.extra
        self.opt.state.pop(everything[i], None)

    def read(self, i: int) -> None:
        everything = self.params + self.extra
        _ = self.opt.state[everything[i]]  # torch's defaultdict: an empty entry when there was none

    def override(self, i: int, key: str, value) -> None:
        everything = self.params + self.extra
        dist8.GlobalOptimManager.get_instance().override_config(everything[i], key, value)

    def resize(self, i: int, n: int) -> None:
        self.params[i].data = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(self.case.dtype)

    def snapshot(self) -> tuple:
        state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in sorted(self.opt.state.get(p, {}).items())}
                 for group in self.opt.param_groups for p in group["params"]]
        return [p.detach().clone() for p in self.params + self.extra], state, self.opt.nonfinite_skips


class Case:
    """A seeded optimizer and a seeded sequence of operations."""

    def __init__(self, seed: int, index: int) -> None:
        rng = random.Random(f"lifecycle/{seed}/{index}")
        self.index, self.rng = index, rng
        self.name = rng.choice(CLASSES)
        kw: dict = dict(lr=rng.choice([1e-3, 1e-2, 0.1]), min_8bit_size=rng.choice([1, 300, 4096]))
        if self.name in ("SGD8bit", "LARS8bit"):
            kw["momentum"] = 0.9
        if self.name == "RMSprop8bit":
            kw["momentum"] = rng.choice([0.0, 0.9])
        if self.name not in ("SGD8bit", "LARS8bit", "Adagrad8bit") and rng.random() < 0.3:
            kw["weight_decay"] = 0.1
        if rng.random() < 0.2:
            kw["percentile_clipping"] = 5
        if rng.random() < 0.3:
            kw["block_wise"] = rng.random() < 0.5
        self.dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
        if self.dtype != torch.float32 and rng.random() < 0.6:
            kw["master_weight_bits"] = rng.choice([24, 32])
        self.kw = kw

    def __repr__(self) -> str:
        return f"lifecycle case {self.index}: {self.name}({self.kw}) {self.dtype}"

    def operation(self) -> tuple:
        rng = self.rng
        r = rng.random()
        if r < 0.45:
            gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
            grads = {}
            for n in SIZES + EXTRA_SIZES:
                if rng.random() < 0.85:
                    g = torch.randn(n, generator=gen) * rng.choice([1.0, 1e-3, 1e3])
                    if rng.random() < 0.2:
                        g[: n // 3] = 0
                    if rng.random() < 0.05:
                        g[rng.randrange(n)] = float("nan")
                    grads[n] = g
            return ("step", grads)
        if r < 0.58:
            key, value = rng.choice([
                ("lr", 1e-4), ("lr", 3e-3), ("lr", 0.0), ("weight_decay", 0.0), ("weight_decay", 0.05),
                ("eps", 1e-6), ("betas", (0.8, 0.99)), ("momentum", 0.5), ("lr", -1.0), ("eps", float("nan")),
                ("betas", (0.9,)), ("optim_bits", 32), ("min_8bit_size", 10), ("percentile_clipping", 3),
                ("block_wise", False), ("master_weight_bits", 24), ("not_a_setting", 1)])
            return ("edit", rng.randrange(3), key, value)
        if r < 0.66:
            return ("add", rng.randrange(2), rng.choice([{}, {"lr": 1e-3}, {"optim_bits": 32}, {"betas": (0.5, 0.6)}]))
        if r < 0.72:
            return ("zero", rng.random() < 0.5)
        if r < 0.78:
            return ("freeze", rng.randrange(3), rng.random() < 0.5)
        if r < 0.82:
            return ("forget", rng.randrange(5))
        if r < 0.86:
            return ("read", rng.randrange(5))
        if r < 0.91:
            key, value = rng.choice([("optim_bits", 32), ("optim_bits", 8), ("lr", 1e-4), ("betas", (0.5, 0.9)),
                                     ("percentile_clipping", 5), ("weight_decay", 0.3), ("min_8bit_size", 1)])
            return ("override", rng.randrange(5), key, value)
        if r < 0.94:
            return ("resize", rng.randrange(3), rng.choice(SIZES + (64,)))
        return ("round_trip",)


def _compare(case: Case, what: str, ref: tuple, got: tuple, done: list) -> None:
    assert all(_same(a, b) for a, b in zip(ref[0], got[0])), f"{case}: {what}: parameters differ after {done}"
    assert len(ref[1]) == len(got[1]), f"{case}: {what}: parameters listed differ after {done}"
    for a, b in zip(ref[1], got[1]):
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a), f"{case}: {what}: state differs after {done}"


# expected where a run edited optim_bits/min_8bit_size and rebuilt itself from its state dict
@pytest.mark.filterwarnings("ignore:the loaded state dict's param group has:UserWarning")
def test_random_lifecycles_agree_across_backends_round_trips_and_step_params(monkeypatch):
    monkeypatch.setenv("DIST8_BACKEND", "cpu")  # each run sets its backend before each operation
    stepped = 0
    for index in range(CASES):
        case = Case(SEED, index)
        try:
            runs = {"cpu": Run(case, "cpu"), "reference": Run(case, "reference"),
                    "rebuilt after every step": Run(case, "cpu", rebuild=True),
                    "step_params": Run(case, "cpu", split=True)}
        except (ValueError, TypeError):
            continue
        done = []
        for _ in range(OPS):
            op = case.operation()
            outcomes = {name: run.apply(*op) for name, run in runs.items()}
            done.append(op[0] if op[0] == "step" else op)
            stepped += op[0] == "step" and outcomes["cpu"] == "ok"
            split = outcomes.pop("step_params", None)
            if split is not None and (split == "ok") != (outcomes["cpu"] == "ok"):
                # step() checks every group, step_params() the groups of the parameters it steps
                assert split == "ok" and "param group" in outcomes["cpu"], f"{case}: step_params: {split} after {done}"
                del runs["step_params"]
            assert len(set(outcomes.values())) == 1, f"{case}: outcomes {outcomes} after {done}"
            snapshots = {name: run.snapshot() for name, run in runs.items()}
            for name, snap in snapshots.items():
                if name != "cpu":
                    _compare(case, name, snapshots["cpu"], snap, done)
    assert stepped > CASES, stepped  # the draw steps, not only refuses


class _Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(16, 40), torch.nn.Linear(40, 40), torch.nn.Linear(40, 8))
        self.to(dtype)
        self.c.requires_grad_(False)  # trained from an add_param_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


RELEASE_CASES = 80


def _release_case(seed: int, index: int):
    rng = random.Random(f"release/{seed}/{index}")
    name = rng.choice(CLASSES)
    kw: dict = dict(lr=rng.choice([1e-3, 1e-2]), min_8bit_size=rng.choice([1, 300, 4096]))
    if name in ("SGD8bit", "LARS8bit"):
        kw["momentum"] = 0.9
    if rng.random() < 0.2:
        kw["percentile_clipping"] = 5
    dtype = rng.choice([torch.float32, torch.bfloat16])
    if dtype == torch.bfloat16:
        kw["master_weight_bits"] = rng.choice([24, 32])
    return rng, name, kw, dtype


@pytest.mark.filterwarnings("ignore:the loaded state dict's param group has:UserWarning")
def test_random_lifecycles_under_gradient_release_equal_the_plain_steps():
    """The same kind of sequences through a model's backward: one run under ``dist8.gradient_release``, one
    stepping normally, with group edits valid and invalid (two groups: an invalid value in the group of the
    first layers, stepped last in backward order), late overrides, ``add_param_group`` of a layer unfrozen,
    freezing, and round trips that build a new optimizer and release. The same outcomes and bitwise the same
    parameters after every operation. Found: an invalid group value was refused by the hooks only after other
    groups' parameters had been stepped (now refused in the forward)."""
    stepped = 0
    for index in range(RELEASE_CASES):
        rng, name, kw, dtype = _release_case(SEED, index)
        nets = [_Net(dtype), _Net(dtype)]

        def built(net, groups=None):
            groups = groups or [{"params": list(net.a.parameters())}, {"params": list(net.b.parameters())}]
            return getattr(dist8, name)(groups, **kw)

        opts = [built(nets[0]), built(nets[1])]
        handle = dist8.gradient_release(nets[1], opts[1])
        done, added = [], False
        for _ in range(OPS):
            r = rng.random()
            outcomes = []
            if r < 0.5:
                x = torch.randn(4, 16, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).to(dtype)
                for net, opt in zip(nets, opts):
                    try:
                        net(x).float().square().mean().backward()
                        opt.step()
                        outcomes.append("ok")
                    except ValueError as exc:
                        outcomes.append(str(exc))
                    opt.zero_grad()
                op = "step"
            elif r < 0.64:
                gi, (key, value) = rng.randrange(2), rng.choice([
                    ("lr", 1e-4), ("weight_decay", 0.05), ("lr", -1.0), ("eps", float("nan")), ("optim_bits", 32),
                    ("percentile_clipping", 3), ("betas", (0.8, 0.9))])
                for opt in opts:
                    opt.param_groups[gi][key] = value
                op = ("edit", gi, key, value)
            elif r < 0.72 and not added:
                for net, opt in zip(nets, opts):
                    net.c.requires_grad_(True)
                    opt.add_param_group({"params": list(net.c.parameters())})
                added, op = True, "add"
            elif r < 0.8:
                i, (key, value) = rng.randrange(2), rng.choice([("lr", 1e-5), ("optim_bits", 32), ("weight_decay", 0.2)])
                for net in nets:
                    dist8.GlobalOptimManager.get_instance().override_config((net.a.weight, net.b.weight)[i], key, value)
                op = ("override", i, key, value)
            elif r < 0.88:
                for k, (net, opt) in enumerate(zip(nets, opts)):
                    buffer = io.BytesIO()
                    torch.save(opt.state_dict(), buffer)
                    buffer.seek(0)
                    new = built(net, [{"params": group["params"]} for group in opt.param_groups])
                    try:
                        new.load_state_dict(torch.load(buffer, weights_only=True))
                    except ValueError as exc:
                        outcomes.append(str(exc))
                        continue
                    outcomes.append("ok")
                    if k == 1:
                        handle.remove()
                        handle = dist8.gradient_release(net, new)
                    opts[k] = new
                op = "round trip"
            else:
                i, flag = rng.randrange(2), rng.random() < 0.5
                for net in nets:
                    (net.a.weight, net.b.weight)[i].requires_grad_(flag)
                op = ("freeze", i, flag)
            done.append(op)
            stepped += op == "step" and outcomes[0] == "ok"
            where = f"release case {index}: {name}({kw}) {dtype} after {done}"
            assert len(set(outcomes)) <= 1 or [o == "ok" for o in outcomes] == [True, True] or (
                "ok" not in outcomes), f"{where}: {outcomes}"
            for (n, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
                assert _same(p.detach(), q.detach()), f"{where}: {n} differs"
        handle.remove()
    assert stepped > RELEASE_CASES, stepped
