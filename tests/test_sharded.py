"""ShardedOptimizer on 1-4 gloo ranks: bitwise equal to the unsharded optimizer, bytes, clipping, accumulation."""
import contextlib
import zlib

import pytest
import torch
import torch.distributed as dist

import dist8
from dist8.shard import BlockLayout, ShardedOptimizer
from dist_utils import run_ranks

SHAPES = {"a.weight": (33, 100), "a.bias": (33,), "b.weight": (7, 300), "c": (1,), "d": (256,), "e": (513,)}
OPTIMIZERS = {
    "AdamW8bit": (dist8.AdamW8bit, dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)),
    "SGD8bit": (dist8.SGD8bit, dict(lr=1e-2, momentum=0.9, min_8bit_size=0)),
    "Lion8bit": (dist8.Lion8bit, dict(lr=1e-3, weight_decay=0.1, min_8bit_size=0)),
    "LAMB8bit": (dist8.LAMB8bit, dict(lr=1e-2, weight_decay=0.01, min_8bit_size=0)),
    "AdEMAMix8bit": (dist8.AdEMAMix8bit, dict(lr=1e-2, t_alpha=5, t_beta3=5, min_8bit_size=0)),  # three states
}


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}


def rank_grad(name, rank, step):
    """Dyadic gradients: sums across ranks are exact in float32, so averages are well defined."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{step}".encode()))
    return torch.randint(-512, 512, SHAPES[name], generator=gen).float() / 1024


def assemble(shards, name_index, numel, block_size):
    """Full state of one parameter from the ranks' piece states."""
    full = {}
    for shard in shards:
        for piece_param, start, stop in shard["pieces"]:
            if piece_param != name_index or piece_param not in shard["state"]:
                continue
            st = shard["state"][piece_param]
            for key, value in st.items():
                if not torch.is_tensor(value):
                    full[key] = value
                    continue
                size = numel if key.startswith("state") else (numel + block_size - 1) // block_size
                buf = full.setdefault(key, torch.empty(size, dtype=value.dtype))
                lo = start if key.startswith("state") else start // block_size
                buf[lo : lo + value.numel()] = value.reshape(-1)
    return full


def _train_sharded(rank, world_size, opt_name, stage, steps):
    cls, kw = OPTIMIZERS[opt_name]
    params = make_params()
    opt = ShardedOptimizer(list(params.items()), cls, stage=stage, **kw)
    for step in range(steps):
        opt.zero_grad()
        if stage == 2:
            loss = sum((p * rank_grad(n, rank, step)).sum() for n, p in params.items())
            loss.backward()
        else:  # stage 1 takes averaged gradients
            for n, p in params.items():
                g = rank_grad(n, rank, step)
                dist.all_reduce(g)
                p.grad = g / world_size
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in params.items()}, **opt.state_dict(),
            "nbytes": opt.state_nbytes()}


def _train_reference(opt_name, world_size, steps):
    cls, kw = OPTIMIZERS[opt_name]
    params = make_params()
    opt = cls(list(params.items()), **kw)
    for step in range(steps):
        for n, p in params.items():
            p.grad = sum(rank_grad(n, r, step) for r in range(world_size)) / world_size
        opt.step()
    return params, opt


def _all_optimizers(rank, world_size, stage, steps):
    return {name: _train_sharded(rank, world_size, name, stage, steps) for name in OPTIMIZERS}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_bitwise_equal_to_unsharded(world_size, tmp_path):
    steps = 20
    results = run_ranks(_all_optimizers, world_size, 2, steps, tmp_path=tmp_path)
    for opt_name in OPTIMIZERS:
        ref_params, ref_opt = _train_reference(opt_name, world_size, steps)
        # equal to a reference that trained (two runs that did not would be equal too)
        assert all(ref_opt.state[p]["step"] == steps for p in ref_params.values()), opt_name
        shards = [r[opt_name] for r in results]
        if opt_name == "LAMB8bit":
            # Trust ratios sum squares across ranks in another order than one process does: equal
            # to float64 rounding of the norms, which can move a float32 result by an ulp.
            for rank_result in shards:
                for n, p in ref_params.items():
                    torch.testing.assert_close(rank_result["params"][n], p.detach(), rtol=1e-5, atol=1e-6)
            continue
        for rank_result in shards:
            for n, p in ref_params.items():
                assert torch.equal(rank_result["params"][n], p.detach()), f"{opt_name} {n} rank {rank_result['rank']}"
        for i, (n, p) in enumerate(ref_params.items()):
            full = assemble(shards, i, p.numel(), 256)
            for key, value in ref_opt.state[p].items():
                if torch.is_tensor(value):
                    assert torch.equal(full[key], value.reshape(-1)), f"{opt_name} {n} {key}"
                else:
                    assert full[key] == value


def _inject_nonfinite(name, g, step):
    """inf/NaN in a first block, a last partial block, and a finite 3e38 (its square overflows)."""
    g = g.clone()
    if step == 1 and name == "b.weight":
        g.view(-1)[5] = float("nan")
    if step == 2 and name == "e":
        g.view(-1)[-1] = float("inf")
    if step == 3 and name == "a.weight":
        g.view(-1)[1000] = 3e38
    return g


def _nonfinite_sharded(rank, world_size):
    out = {}
    for opt_name in ("AdamW8bit", "SGD8bit"):
        cls, kw = OPTIMIZERS[opt_name]
        params = make_params()
        opt = ShardedOptimizer(list(params.items()), cls, stage=1, **kw)
        for step in range(5):
            for n, p in params.items():
                g = rank_grad(n, rank, step)
                dist.all_reduce(g)
                p.grad = _inject_nonfinite(n, g / world_size, step)
            opt.step()
        out[opt_name] = {"params": {n: p.detach().clone() for n, p in params.items()}, "skips": opt.nonfinite_skips,
                         **opt.state_dict()}
    return out


def test_nonfinite_blocks_skipped_as_unsharded(tmp_path):
    """Per-block skips (default on_nonfinite="skip") on 2 ranks: parameters and state bitwise the
    unsharded run's, and the ranks' skip counts sum to its count."""
    world_size = 2
    results = run_ranks(_nonfinite_sharded, world_size, tmp_path=tmp_path)
    for opt_name in ("AdamW8bit", "SGD8bit"):
        cls, kw = OPTIMIZERS[opt_name]
        params = make_params()
        ref = cls(list(params.items()), **kw)
        for step in range(5):
            for n, p in params.items():
                g = sum(rank_grad(n, r, step) for r in range(world_size)) / world_size
                p.grad = _inject_nonfinite(n, g, step)
            ref.step()
        expected = 3 if opt_name == "AdamW8bit" else 2  # SGD's momentum holds 3e38
        assert ref.nonfinite_skips == expected, opt_name
        shards = [r[opt_name] for r in results]
        assert sum(r["skips"] for r in shards) == expected, opt_name
        for rank_result in shards:
            for n, p in params.items():
                assert torch.equal(rank_result["params"][n], p.detach()), f"{opt_name} {n}"
                assert torch.isfinite(p).all()
        for i, (n, p) in enumerate(params.items()):
            full = assemble(shards, i, p.numel(), 256)
            for key, value in ref.state[p].items():
                if torch.is_tensor(value):
                    assert torch.equal(full[key], value.reshape(-1)), f"{opt_name} {n} {key}"


def test_stage1_bitwise_equal_and_bytes_match_layout(tmp_path):
    world_size = 3
    results = run_ranks(_all_optimizers, world_size, 1, 5, tmp_path=tmp_path)
    ref_params, _ = _train_reference("AdamW8bit", world_size, 5)
    layout = BlockLayout(list(SHAPES), list(SHAPES.values()), 256)
    ranges = layout.block_ranges(world_size)
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1
    for r, res in enumerate(results):
        for n, p in ref_params.items():
            assert torch.equal(res["AdamW8bit"]["params"][n], p.detach())
        # min_8bit_size=0: every piece is 8-bit: 2 code bytes per element + 2 fp32 absmax per block.
        assert res["AdamW8bit"]["nbytes"] == layout.shard_elements(r, world_size) * 2 + sizes[r] * 8


def _clip_and_accumulate(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2, min_8bit_size=0, bucket_cap_mb=0.005)
    gen = torch.Generator().manual_seed(rank)
    xs = [torch.randn(8, 40, generator=gen) for _ in range(2)]
    # two micro-batches accumulated without communication, then clip
    with opt.no_sync():
        model(xs[0]).square().sum().backward()
    model(xs[1]).square().sum().backward()
    norm = opt.clip_grad_norm(0.5)
    clipped = {i: v.grad.clone() for i, v in zip([p.param for p in opt.pieces], opt._piece_views)}
    opt.clip_grad_norm(1e6)  # above the norm: the gradients stay as they are (coefficient capped at 1)
    assert all(torch.equal(v.grad, clipped[p.param]) for p, v in zip(opt.pieces, opt._piece_views))
    return {"norm": norm, "clipped": clipped, "pieces": [[p.param, p.start, p.stop] for p in opt.pieces],
            "xs": xs, "init": {n: p.detach().clone() for n, p in model.named_parameters()}}


def test_clip_and_accumulation_match_torch_on_full_gradient(tmp_path):
    world_size = 2
    results = run_ranks(_clip_and_accumulate, world_size, tmp_path=tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    # one big batch of all ranks' micro-batches, loss averaged over ranks like DDP
    big = torch.cat([x for r in results for x in r["xs"]])
    (model(big).square().sum() / world_size).backward()
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert torch.allclose(results[0]["norm"], want, rtol=1e-5)
    assert torch.equal(results[0]["norm"], results[1]["norm"])
    grads = [p.grad.reshape(-1) for p in model.parameters()]
    for res in results:
        for param, start, stop in res["pieces"]:
            torch.testing.assert_close(res["clipped"][param], grads[param][start:stop], rtol=1e-5, atol=1e-7)


def _mismatch(rank, world_size):
    shapes = [(10, 10), (5,)] if rank == 0 else [(10, 10), (6,)]
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(s))) for i, s in enumerate(shapes)]
    try:
        ShardedOptimizer(params, dist8.AdamW8bit)
    except ValueError as exc:
        return str(exc)
    return None


def test_parameters_differing_across_ranks_named(tmp_path):
    messages = run_ranks(_mismatch, 2, tmp_path=tmp_path)
    assert all(m is not None and "p1" in m for m in messages)


def _one_rank_differs(rank, world_size, how):
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    if rank == 1 and how == "meta":  # the low-memory habit: ranks > 0 build on meta, rank 0 holds the weights
        with torch.device("meta"):
            model = torch.nn.Linear(64, 64)
    else:
        model = torch.nn.Linear(64, 64)
        if rank == 1 and how == "dtype":
            model.bias.data = model.bias.data.to(torch.bfloat16)
    try:
        ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("how", ["meta", "dtype"])
def test_a_refusal_on_one_rank_at_construction_is_raised_on_every_rank(tmp_path, how):
    """A model on the meta device on one rank only was refused there, before the layout check, while the
    other ranks waited in that check's collective forever; a parameter of another dtype on one rank passed
    the check (names and shapes only) and broke the parameter broadcast. Both are one line on every rank."""
    messages = run_ranks(_one_rank_differs, 2, how, tmp_path=tmp_path)
    if how == "meta":
        assert messages[1].startswith("parameter weight is on the meta device: materialise the model")
        assert messages[0] == f"ShardedOptimizer was refused on rank 1: {messages[1]}"
    else:
        assert messages == ["parameters differ across ranks: parameter bias is float32 on rank 0 but bfloat16 on "
                            "rank 1; cast the model the same way on every rank"] * 2


def _raise_on_a_parameter_one_rank_holds(rank, world_size, stage):
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, on_nonfinite="raise",
                           min_8bit_size=0)
    # a NaN in backward's gradient of 1.bias, which stage 2 sums onto the owner of 1.bias alone
    model[1].bias.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan")))
    model(torch.randn(4, 64)).sum().backward()
    if stage == 1:  # the gradients DDP would give: averaged, the same on every rank
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
    owns = any(opt.names[piece.param] == "1.bias" for piece in opt.pieces)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
    except FloatingPointError as exc:
        return {"owns": owns, "refused": str(exc),
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters()))}
    return {"owns": owns, "refused": None}


@pytest.mark.parametrize("stage", [1, 2])
def test_on_nonfinite_raise_is_raised_on_every_rank_before_any_update(stage, tmp_path):
    """A non-finite gradient in a parameter one rank holds alone (a small bias): that rank raised, the others
    went on into the parameter all-gather and waited there forever; every rank raises now, naming it, with
    nothing updated."""
    results = run_ranks(_raise_on_a_parameter_one_rank_holds, 2, stage, tmp_path=tmp_path)
    assert sorted(r["owns"] for r in results) == [False, True]
    for r in results:
        assert r["refused"] == "non-finite gradient in parameter 1.bias; step skipped, state untouched", r
        assert r["unchanged"]


def _more_ranks_than_blocks(rank, world_size):
    p = torch.nn.Parameter(torch.arange(300, dtype=torch.float32))  # 2 blocks on 4 ranks
    opt = ShardedOptimizer([("p", p)], dist8.AdamW8bit, lr=0.1, min_8bit_size=0)
    for _ in range(3):
        opt.zero_grad()
        (p * (rank + 1)).sum().backward()
        opt.step()
    return {"p": p.detach().clone(), "pieces": len(opt.pieces)}


def test_empty_shard_rank_works(tmp_path):
    results = run_ranks(_more_ranks_than_blocks, 4, tmp_path=tmp_path)
    assert sorted(r["pieces"] for r in results) == [0, 0, 1, 1]
    assert all(torch.equal(r["p"], results[0]["p"]) for r in results)
    ref = torch.nn.Parameter(torch.arange(300, dtype=torch.float32))
    opt = dist8.AdamW8bit([ref], lr=0.1, min_8bit_size=0)
    for _ in range(3):
        ref.grad = torch.full((300,), 2.5)
        opt.step()
    assert torch.equal(results[0]["p"], ref.detach())


# ---- full state dicts: what clients that save rank 0's optimizer.state_dict() need ---------------------------
FULL_CASES = ("AdamW8bit", "LAMB8bit", "AdEMAMix8bit")


def _averaged_grads(params, step, world_size):
    for n, p in params.items():  # what DDP gives stage 1: dyadic, so the average is exact
        p.grad = sum(rank_grad(n, r, step) for r in range(world_size)) / world_size


def _full_state_dicts(rank, world_size):
    out = {}
    for name in FULL_CASES:
        cls, kw = OPTIMIZERS[name]
        params = make_params()
        opt = ShardedOptimizer(list(params.items()), cls, stage=1, full_state_dict=True, percentile_clipping=90, **kw)
        for step in range(3):
            _averaged_grads(params, step, world_size)
            opt.step()
        out[name] = opt.state_dict()
    # the default's shard state dict, rank 0's loaded on every rank (what such a client does): refused on rank 1
    cls, kw = OPTIMIZERS["AdamW8bit"]
    params = make_params()
    opt = ShardedOptimizer(list(params.items()), cls, stage=1, **kw)
    _averaged_grads(params, 0, world_size)
    opt.step()
    rank0 = [opt.state_dict()]
    dist.broadcast_object_list(rank0, src=0)
    try:
        opt.load_state_dict(rank0[0])
        out["shard refusal"] = None
    except ValueError as err:
        out["shard refusal"] = str(err)
    return out


def _same_state_dict(a, b, where):
    assert a["state"].keys() == b["state"].keys(), where
    for i, st in b["state"].items():
        assert a["state"][i].keys() == st.keys(), (where, i)
        for k, v in st.items():
            assert torch.equal(a["state"][i][k], v) if torch.is_tensor(v) else a["state"][i][k] == v, (where, i, k)


def test_full_state_dict_is_the_unsharded_one_and_loads_at_any_world_size(tmp_path):
    """``full_state_dict=True``: every rank's ``state_dict()`` is bitwise the unsharded optimizer's (8-bit codes,
    absmax, the percentile history; three states for AdEMAMix), and it loads into one process (or any world
    size) and continues bitwise. The unsharded optimizer's own state dict loads the same way. The default's
    shard dict loaded on another rank is refused naming the option, on every rank; a full dict with a tensor of the wrong
    size is refused naming the parameter, before anything is loaded."""
    import copy

    results = run_ranks(_full_state_dicts, 2, tmp_path=tmp_path)
    # rank 0, whose own shard it is, refuses too: a load refused on one rank changes nothing on any
    assert results[0]["shard refusal"].startswith("ShardedOptimizer.load_state_dict failed on rank 1: state_dict "
                                                  "is rank 0 of 2's shard; this is rank 1 of 2")
    assert "full_state_dict=True" in results[1]["shard refusal"] and "rank 0 of 2" in results[1]["shard refusal"]
    for name in FULL_CASES:
        cls, kw = OPTIMIZERS[name]
        kw = dict(kw, percentile_clipping=90)
        ref_params = make_params()
        ref = cls(list(ref_params.items()), **kw)
        for step in range(3):
            _averaged_grads(ref_params, step, 2)
            ref.step()
        for r in results:
            _same_state_dict(r[name], ref.state_dict(), f"{name} rank state dict")
        for source in ("2 ranks' full state dict", "the unsharded optimizer's"):
            params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ref_params.items()}
            one = ShardedOptimizer(list(params.items()), cls, stage=1, **kw)  # one process, default mode
            one.load_state_dict(results[0][name] if source.startswith("2") else ref.state_dict())
            cont_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in ref_params.items()}
            cont_ref = cls(list(cont_params.items()), **kw)  # the unsharded run, continued from the same state
            cont_ref.load_state_dict(ref.state_dict())
            for step in range(3, 5):
                _averaged_grads(params, step, 2)
                _averaged_grads(cont_params, step, 2)
                one.step()
                cont_ref.step()
            for n in params:
                assert torch.equal(params[n], cont_params[n]), (name, source, n)
    bad = copy.deepcopy(results[0]["AdamW8bit"])
    bad["state"][2]["state1"] = bad["state"][2]["state1"].reshape(-1)[:100]  # b.weight: 100 codes of 2100
    cls, kw = OPTIMIZERS["AdamW8bit"]
    one = ShardedOptimizer(list(make_params().items()), cls, stage=1, **kw)
    with pytest.raises(ValueError, match=r"^state1 of parameter b\.weight has 100 entries, expected 2100"):
        one.load_state_dict(bad)
    assert not any(one.inner.state.values())


def _late_rank_full_state_dict(rank, world_size):
    import time
    import warnings

    from dist8.shard import collectives

    collectives.WAIT_WARN_SECONDS = 1.0
    opt = ShardedOptimizer(list(make_params().items()), dist8.AdamW8bit, stage=1, full_state_dict=True)
    if rank == 1:
        time.sleep(4.0)  # as a client that calls state_dict() on rank 0 only would, for a while
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.state_dict()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_full_state_dict_called_on_one_rank_says_why_it_waits(tmp_path):
    """``state_dict()`` with ``full_state_dict=True`` is collective; a rank that calls it alone (HF Trainer
    without the callback) warns after ``collectives.WAIT_WARN_SECONDS`` naming what is missing, instead
    of waiting without a word. The rank that comes late does not warn."""
    warned = run_ranks(_late_rank_full_state_dict, 2, tmp_path=tmp_path)
    assert len(warned[0]) == 1 and warned[1] == []
    assert warned[0][0].startswith("rank 0 has waited 1 s in ShardedOptimizer.state_dict() (full_state_dict=True)")
    assert "every rank must call it" in warned[0][0] and "ShardedStateDictCallback" in warned[0][0]


# Which parameters take part in each rank's backward, per step (stage 2 tests): a parameter used on
# one rank only (MoE-like), one used by no rank (an unused branch), and back. Step 4: one rank uses
# every parameter, so its backward launches every bucket while the other's waits for "e" (every rank
# hung in the step until 2026-12-03: the collectives were issued in different orders).
USED = {0: {0: "abc", 1: "abc"}, 1: {0: "ac", 1: "abc"}, 2: {0: "a", 1: "ab"}, 3: {0: "bc", 1: "b"},
        4: {0: "abcd", 1: "abcde"}}


def _used(step, rank):
    return [n for n in SHAPES if n[0] in USED[step][rank]]


def _stage2_without_some_grads(rank, world_size, zero):
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(240, exit=True, file=sys.stderr)  # a hang fails in minutes, with stacks
    out = {}
    for name in ("AdamW8bit", "SGD8bit"):
        cls, kw = OPTIMIZERS[name]
        params = make_params()
        # "frozen": a parameter that did not require grad is given too (LoRA): the layout check's all-reduce
        # ran before the buckets backward left unlaunched, and every rank hung (until 2026-12-04)
        frozen = [("frozen", torch.nn.Parameter(torch.zeros(300), requires_grad=False))] if zero == "frozen" else []
        opt = ShardedOptimizer(list(params.items()) + frozen, cls, stage=2, **kw)
        for step in USED:
            if zero in ("optimizer", "frozen"):
                opt.zero_grad()
            else:  # as model.zero_grad() does: .grad = None, the flat buffer untouched
                for p in params.values():
                    p.grad = None
            used = _used(step, rank)
            if zero == "assigned":  # gradients set by hand, no backward
                for n in used:
                    params[n].grad = rank_grad(n, rank, step)
            elif used:
                sum((params[n] * rank_grad(n, rank, step)).sum() for n in used).backward()
            opt.step()
        out[name] = {n: p.detach().clone() for n, p in params.items()}
    if zero == "assigned" and world_size > 1:  # a gradient replaced after backward reduced it: refused
        params = make_params()
        opt = ShardedOptimizer(list(params.items()), dist8.AdamW8bit, stage=2)
        sum(p.sum() for p in params.values()).backward()
        params["b.weight"].grad = params["b.weight"].grad * 2
        try:
            opt.step()
        except ValueError as exc:
            out["replaced"] = str(exc)
    faulthandler.cancel_dump_traceback_later()
    return out


@pytest.mark.parametrize("zero", ["optimizer", "model", "assigned", "frozen"])
def test_stage2_skips_parameters_without_a_gradient_as_torch_does(zero, tmp_path):
    """Stage 2 keeps ``.grad`` as views of its flat buffer; a parameter no rank's backward reached must
    still be skipped as torch's optimizers skip a None gradient (no momentum or weight-decay move),
    after ``optimizer.zero_grad()`` and after ``model.zero_grad()`` (which used to leave the last
    gradient in the buffer, applied again), and gradients assigned to ``.grad`` without backward are
    used. A parameter used on one rank only steps with the average (zeros from the other). Bitwise
    the unsharded optimizer given what DDP would give it."""
    results = run_ranks(_stage2_without_some_grads, 2, zero, tmp_path=tmp_path)
    for name in ("AdamW8bit", "SGD8bit"):
        cls, kw = OPTIMIZERS[name]
        params = make_params()
        ref = cls(list(params.items()), **kw)
        for step in USED:
            for n, p in params.items():
                users = [r for r in range(2) if n in _used(step, r)]
                p.grad = sum(rank_grad(n, r, step) for r in users) / 2 if users else None
            ref.step()
        for r, res in enumerate(results):
            for n, p in params.items():
                assert torch.equal(res[name][n], p.detach()), f"{zero}: {name} {n} on rank {r}"
    if zero == "assigned":
        assert results[0]["replaced"].startswith("parameter b.weight: .grad was replaced after backward")


def _changed_after_backward(rank, world_size, who):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=2, lr=1e-2, min_8bit_size=0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))
    model(x).square().mean().backward()
    if who == "clip":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # this rank's partial sums: a per-rank norm
    elif rank == 0:
        model[0].weight.grad.mul_(0.5)  # one rank only: the other must not wait forever
    try:
        opt.step()
        refused = None
    except ValueError as exc:
        refused = str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()  # and the optimizer goes on: the right way to clip
    model(x).square().mean().backward()
    norm = float(opt.clip_grad_norm(1.0))
    opt.step()
    return {"refused": refused, "unchanged": unchanged, "norm": norm,
            "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.parametrize("who", ["clip", "one-rank"])
def test_stage2_refuses_gradients_changed_in_place_after_backward(who, tmp_path):
    """torch.nn.utils.clip_grad_norm_ on stage 2's .grad views read each rank's partial sums mid-reduction:
    norms 0.194 and 0.203 on two ranks for a global 0.150, and a silently different run. Now refused on
    every rank (also when one rank alone changed them), nothing stepped, and opt.clip_grad_norm works after."""
    results = run_ranks(_changed_after_backward, 2, who, tmp_path=tmp_path)
    mine = "gradients were changed in place after backward (torch.nn.utils.clip_grad_norm_? p.grad.mul_?)"
    if who == "clip":
        assert all(r["refused"].startswith(mine) for r in results), results[0]["refused"]
    else:
        assert results[0]["refused"].startswith(mine)
        assert results[1]["refused"].startswith(f"this step's gradients were refused on rank 0: {mine}")
    assert all("opt.clip_grad_norm(max_norm)" in r["refused"] for r in results)
    assert all(r["unchanged"] for r in results)
    assert results[0]["norm"] == results[1]["norm"]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)


def _two_backwards(rank, world_size, use_no_sync):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=2, lr=1e-2, min_8bit_size=0,
                           bucket_cap_mb=0.001)
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(3):
        try:
            for micro in range(2):
                x = torch.randn(8, 64, generator=gen)
                with opt.no_sync() if use_no_sync and micro == 0 else contextlib.nullcontext():
                    model(x).square().mean().backward()
            opt.step()
        except RuntimeError as exc:
            return {"refused": str(exc)}
        opt.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()]}


def test_stage2_refuses_accumulating_over_backward_passes_without_no_sync(tmp_path):
    """Two backward passes before step() without no_sync() (fine under DDP) lost the second gradient of every
    parameter whose bucket the first had reduced: 0.03 away from the accumulated run after 3 steps, silently."""
    plain, synced = (run_ranks(_two_backwards, 2, flag, tmp_path=tmp_path) for flag in (False, True))
    assert all(r["refused"].startswith("parameter 1.bias got a second gradient before step()") and
               "with opt.no_sync():" in r["refused"] for r in plain), plain[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0)
    gens = [torch.Generator().manual_seed(10 + r) for r in range(2)]
    for _ in range(3):
        for _micro in range(2):
            xs = [torch.randn(8, 64, generator=g) for g in gens]
            (sum(model(x).square().mean() for x in xs) / 2).backward()
        opt.step()
        opt.zero_grad()
    for r in synced:
        for a, b in zip(r["params"], model.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-6)  # sums in another order


def _checkpointed_inside_and_outside(rank, world_size, reentrant):
    import faulthandler

    from torch.utils.checkpoint import checkpoint

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(40, 40), "b": torch.nn.Linear(40, 40)})
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=2, bucket_cap_mb=0.001)
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(rank))
    reentrant = reentrant == "rank 1" and rank == 1 or reentrant is True
    before = [p.detach().clone() for p in model.parameters()]
    try:
        h = checkpoint(lambda t: model["b"](torch.relu(model["a"](t))), x.requires_grad_(), use_reentrant=reentrant)
        model["a"](h).square().mean().backward()  # "a" is used outside the checkpointed block too
        opt.step()
    except RuntimeError as exc:
        return {"refused": str(exc), "unchanged": all(torch.equal(a, p) for a, p in zip(before, model.parameters()))}
    return {"params": [p.detach().clone() for p in model.parameters()]}


def test_stage2_names_reentrant_checkpointing_when_a_parameter_gets_two_gradients_in_one_backward(tmp_path):
    """A parameter used inside and outside a reentrant activation checkpoint gets its gradient in two parts
    within one backward (the checkpoint's recomputation runs a backward of its own); the refusal told only of
    several backward passes and no_sync(). It names use_reentrant=False now; that setting steps."""
    reentrant, plain = (run_ranks(_checkpointed_inside_and_outside, 2, flag, tmp_path=tmp_path) for flag in (True, False))
    for r in reentrant:
        assert r["refused"].startswith("parameter a.") and "got a second gradient before step()" in r["refused"], r
        assert "use use_reentrant=False" in r["refused"] and "with opt.no_sync():" in r["refused"]
    assert all("params" in r for r in plain), plain
    for a, b in zip(*(r["params"] for r in plain)):
        assert torch.equal(a, b)


def test_stage2_a_second_gradient_on_one_rank_only_is_refused_on_every_rank(tmp_path):
    """The refusal of a second gradient was raised inside backward, on the rank that got it: when only one
    rank did (a reentrant checkpoint on a data-dependent branch), the others went on into the step's
    reductions and waited there forever. It is raised at the step now, on every rank, the others naming
    the rank; nothing is stepped."""
    one = run_ranks(_checkpointed_inside_and_outside, 2, "rank 1", tmp_path=tmp_path)
    assert one[1]["refused"].startswith("parameter a.") and "got a second gradient before step()" in one[1]["refused"]
    assert one[0]["refused"] == f"this step's gradients were refused on rank 1: {one[1]['refused']}", one[0]
    assert one[0]["unchanged"] and one[1]["unchanged"]


def _stage2_under_ddp(rank, world_size, accumulate):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    before = [p.detach().clone() for p in model.parameters()]
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2, min_8bit_size=0)  # stage 2: the default
    wrapped = DDP(model)
    gen = torch.Generator().manual_seed(rank)
    try:
        for micro in range(2 if accumulate else 1):
            with wrapped.no_sync() if accumulate and micro == 0 else contextlib.nullcontext():
                wrapped(torch.randn(16, 64, generator=gen)).square().mean().backward()
        opt.step()
        refused = None
    except (ValueError, RuntimeError) as exc:
        refused = str(exc)
    return {"refused": refused, "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters()))}


@pytest.mark.parametrize("accumulate", [False, True])
def test_stage2_under_ddp_is_refused_naming_ddp(accumulate, tmp_path):
    """ShardedOptimizer's default stage 2 on a DDP-wrapped model (README: stage=1 under DDP) was refused
    naming clip_grad_norm_ (DDP's in-place average looked like a change after backward) or no_sync()
    (DDP's accumulation), neither of which the user called; now the message names DDP and stage=1, on
    every rank, with nothing stepped."""
    for r in run_ranks(_stage2_under_ddp, 2, accumulate, tmp_path=tmp_path):
        assert r["refused"] is not None and r["refused"].startswith(
            "these parameters' model is wrapped in DistributedDataParallel"), r["refused"]
        assert "use stage=1 under DDP" in r["refused"] and r["unchanged"]


def _stage1(rank, world_size, how):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    before = [p.detach().clone() for p in model.parameters()]
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=1, lr=1e-2, min_8bit_size=0)
    forward = DDP(model) if how == "ddp" else model
    out = {}
    for step in range(2):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(10 * step + (rank if how in ("no ddp", "ddp") else 0)))
        forward(x).square().mean().backward()
        if how == "one rank has no bias gradient" and rank == 1:
            model[2].bias.grad = None
        try:
            opt.step()
        except RuntimeError as exc:
            out[step] = str(exc)
        opt.zero_grad()
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return out


@pytest.mark.parametrize("how", ["no ddp", "one rank has no bias gradient", "ddp", "same data"])
def test_stage1_refuses_gradients_that_differ_between_ranks(how, tmp_path):
    """stage=1 updates each rank's blocks with that rank's .grad: without DDP (whose average is bitwise
    the same on every rank) each block was trained on its owner's batch alone, silently. The first
    step with gradients compares an exact fingerprint per parameter across ranks and refuses,
    naming the parameter, stepping nothing; later steps are not checked (one read of the gradients)."""
    for r in run_ranks(_stage1, 2, how, tmp_path=tmp_path):
        if how in ("ddp", "same data"):
            assert r == {"unchanged": False}, r
            continue
        name = "0.weight" if how == "no ddp" else "2.bias"
        assert r[0].startswith(f"ShardedOptimizer(stage=1) takes gradients already averaged across ranks "
                               f"(DDP averages them), but parameter {name}'s gradient differs"), r[0]
        assert "Wrap the model in DistributedDataParallel, or use stage=2" in r[0] and r[1] == r[0]
        assert r["unchanged"]


def _patchwork(rank, world_size, stage, dtype):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(dtype)
    if rank != 0:  # weights loaded on rank 0 only (DDP's habit), the other ranks' left at another random init
        torch.manual_seed(rank)
        for p in model.parameters():
            torch.nn.init.normal_(p)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2, min_8bit_size=0)
    start = [p.detach().clone() for p in model.parameters()]
    forward = DDP(model) if stage == 1 else model
    for step in range(2):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(10 * step + rank)).to(dtype)
        forward(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return start, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("stage,dtype", [(2, torch.float32), (2, torch.bfloat16), (1, torch.float32)])
def test_parameters_start_from_the_first_ranks_values(stage, dtype, tmp_path):
    """Each rank's blocks used to start from that rank's values: weights loaded on rank 0 only, or a
    different random init per rank, left the model a patchwork of the ranks' values after the first
    step (stage 2; with bf16 the fp32 masters took each rank's values too). The optimizer now
    broadcasts the first rank's values at construction, as DDP does; the run equals one in which
    every rank starts from rank 0's values."""
    runs = run_ranks(_patchwork, 2, stage, dtype, tmp_path=tmp_path)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).to(dtype)
    for start, end in runs:
        assert all(torch.equal(a, b) for a, b in zip(start, reference.parameters()))
        assert all(torch.equal(a, b) for a, b in zip(end, runs[0][1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][1], reference.parameters()))  # it trained


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = torch.nn.Linear(300, 30)
    with pytest.raises(ValueError, match="parameter weight is on the meta device: materialise the model"):
        ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2)


def _compiled_step(rank, world_size, compiled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 300), torch.nn.GELU(), torch.nn.Linear(300, 8))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2, min_8bit_size=0)

    def update():
        opt.clip_grad_norm(0.05)
        opt.step()

    update = torch.compile(update) if compiled else update
    for step in range(3):
        model(torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * step + rank))).square().mean().backward()
        update()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_compiled_step_is_the_eager_step(tmp_path):
    """torch.compile over ShardedOptimizer.step traced its collectives and moved parameters by up to
    10x the learning rate, silently (ranks agreeing); step and clip_grad_norm now run eagerly inside
    a compiled function (a graph break), bitwise the eager run."""
    eager, compiled = (run_ranks(_compiled_step, 2, c, tmp_path=tmp_path)[0] for c in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_single_process_errors():
    with pytest.raises(RuntimeError, match="not initialised"):
        ShardedOptimizer([torch.nn.Parameter(torch.zeros(4))], process_group=object())
    with pytest.raises(ValueError, match="stage"):
        ShardedOptimizer([torch.nn.Parameter(torch.zeros(4))], stage=3)
    # before: True/2.0 passed as stages, nan/inf failed in int(), a string in a comparison, True was 1 MiB
    for bad in (True, 2.0, "2"):
        with pytest.raises(ValueError, match=f"stage must be 1 or 2, got {bad!r}"):
            ShardedOptimizer([torch.nn.Parameter(torch.zeros(4))], stage=bad)
    for bad in (float("nan"), float("inf"), "25", True, 0, -1):
        with pytest.raises(ValueError, match="bucket_cap_mb must be"):
            ShardedOptimizer([torch.nn.Parameter(torch.zeros(4))], bucket_cap_mb=bad)
    # the optimizer class: an instance's repr spread the message over many lines; a bitsandbytes paged
    # name (a drop-in user's PagedAdamW8bit) was "a function", not why dist8 has none
    w = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(TypeError, match=r"^optimizer_class must be a dist8 optimizer class, got an instance of "
                                        r"AdamW8bit: pass the class[^\n]*$"):
        ShardedOptimizer([w], dist8.AdamW8bit([w]))
    with pytest.raises(ValueError, match=r"^dist8\.PagedAdamW8bit: dist8 has no paged optimizers[^\n]*use "
                                         r"dist8\.AdamW8bit$"):
        ShardedOptimizer([w], dist8.PagedAdamW8bit)
    with pytest.raises(TypeError, match=r"^optimizer_class must be a dist8 optimizer class, got <class 'torch"):
        ShardedOptimizer([w], torch.optim.AdamW)
    layout = BlockLayout(["a", "b"], [(300,), (10,)], 256)
    assert "rank 1" in layout.table(2) and layout.total_blocks == 3


def test_ranks_compare_tensor_group_values_by_their_values():
    """A tensor lr saved on each rank's own GPU reads ``device='cuda:0'`` on one rank and ``'cuda:1'`` on the
    other: compared by repr, the shard files of one save were refused as different saves."""
    from dist8.shard.state_dicts import _comparable

    here, other = torch.tensor(1e-3), torch.tensor(1e-3).requires_grad_()  # reprs differ, values do not
    assert repr(here) != repr(other) and _comparable(here) == _comparable(other)
    assert _comparable(here) != _comparable(torch.tensor(2e-3)) and _comparable(0.5) == repr(0.5)


def test_single_process_state_dict_names_and_bad_groups_refused_before_loading():
    import copy

    model = torch.nn.Linear(64, 64)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-3, min_8bit_size=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]  # torch's named-parameter contract
    assert opt.consolidated_state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    state = {k: v.clone() for k, v in opt.inner.state[opt.inner.param_groups[0]["params"][0]].items()
             if isinstance(v, torch.Tensor)}
    for change, match in ((lambda d: d["param_groups"][0].update(lr=float("nan")),
                           r"^lr must be a finite number \(param group 0 of the loaded state dict\)"),
                          (lambda d: d["param_groups"].append({}), r"^state_dict has 2 param groups, optimizer has 1"),
                          (lambda d: d["state"].update({7: d["state"][0]}),
                           r"^state_dict has state for parameter id 7, which this optimizer's shard does not hold"),
                          (lambda d: d["state"][0].update(step=torch.tensor(float("nan"))),
                           r"^step of parameter weight must be a whole number in \[0, 2\*\*62\], got nan"),
                          # bare KeyErrors / TypeErrors, and "rank 0 of 1's shard; this is rank 0 of 1", before
                          (lambda d: d.pop("fingerprint"),
                           r"^ShardedOptimizer shard state_dict entry 'fingerprint' must be a string, got nothing"),
                          (lambda d: d.update(world_size="1"),
                           r"^ShardedOptimizer shard state_dict entry 'world_size' must be an int, got '1'"),
                          (lambda d: d.update(param_groups=None),
                           r"^ShardedOptimizer shard state_dict entry 'param_groups' must be a list, got None"),
                          (lambda d: d.update(param_groups=[5]),
                           r"^ShardedOptimizer shard state_dict param_groups\[0\] must be a dict, got 5"),
                          (lambda d: d.update(steps=-1),
                           r"^ShardedOptimizer shard state_dict entry 'steps' must be an int >= 0, got -1"),
                          (lambda d: d.update(steps=2.0),
                           r"^ShardedOptimizer shard state_dict entry 'steps' must be an int >= 0, got 2.0"),
                          (lambda d: d.update(dist8=5), r"^state_dict\['dist8'\] must be a dict whose 'quant_map'")):
        bad = copy.deepcopy(sd)
        bad["state"] = {i: {k: (v + 1 if k == "absmax1" else v) for k, v in st.items()} for i, st in bad["state"].items()}
        change(bad)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        after = opt.inner.state[opt.inner.param_groups[0]["params"][0]]
        assert all(torch.equal(after[k], v) for k, v in state.items()) and opt.param_groups[0]["lr"] == 1e-3
    # the same in the unsharded format (full_state_dict=True's, or the unsharded optimizer's own)
    full = opt.consolidated_state_dict()
    for change, match in ((lambda d: d["state"].update({"w": d["state"][0]}),
                           r"^state_dict has state for parameter id 'w', which this optimizer's shard does not hold"),
                          (lambda d: d["state"][1].update(step=float("nan")),
                           r"^step of parameter bias must be a whole number in \[0, 2\*\*62\], got nan"),
                          (lambda d: d["param_groups"][0].pop("params"),
                           r"^state_dict\['param_groups'\]\[0\] must be a dict with a 'params' list")):
        bad = copy.deepcopy(full)
        change(bad)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        after = opt.inner.state[opt.inner.param_groups[0]["params"][0]]
        assert all(torch.equal(after[k], v) for k, v in state.items())


def _gpt_losses(rank, world_size, stage):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist8.train.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, seq_len=16))
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, lr=3e-3, min_8bit_size=0)
    wrapped = DDP(model) if stage == 1 else model
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(10):
        data = torch.randint(0, 256, (4 * world_size, 17), generator=gen)
        x, y = data[rank * 4 : (rank + 1) * 4, :-1], data[rank * 4 : (rank + 1) * 4, 1:]
        opt.zero_grad()
        _, loss = wrapped(x, y)
        loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / world_size)
    return losses


@pytest.mark.parametrize("stage", [1, 2])
def test_small_gpt_stage1_and_stage2_match_unsharded(stage, tmp_path):
    from dist8.train.model import GPT, GPTConfig

    sharded = run_ranks(_gpt_losses, 2, stage, tmp_path=tmp_path)[0]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=32, seq_len=16))
    opt = dist8.AdamW8bit(model.named_parameters(), lr=3e-3, min_8bit_size=0)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(10):
        data = torch.randint(0, 256, (8, 17), generator=gen)
        opt.zero_grad()
        _, loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    # Same global batch; only the order of float sums differs (gradient averaging, norms): 1e-4 relative.
    assert losses[-1] < losses[0]
    for a, b in zip(sharded, losses):
        assert abs(a - b) <= 1e-4 * abs(b), (sharded, losses)


def _steps_without_zero_grad(rank, world_size):
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(120, exit=True, file=sys.stderr)
    out = {}
    for case in ("backward again", "step again"):
        params = make_params()
        opt = ShardedOptimizer(list(params.items()), dist8.AdamW8bit, stage=2, lr=1e-2)
        sum((p * rank_grad(n, rank, 0)).sum() for n, p in params.items()).backward()
        opt.step()
        if case == "backward again":  # no zero_grad(): torch would step on the sum of both steps' gradients
            sum((p * rank_grad(n, rank, 1)).sum() for n, p in params.items()).backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        try:
            opt.step()
            out[case] = "stepped"
        except ValueError as exc:
            out[case] = str(exc)
        out[case + " unchanged"] = all(torch.equal(before[n], p) for n, p in params.items())
        opt.zero_grad()  # the way out: the next step is a normal one
        sum((p * rank_grad(n, rank, 2)).sum() for n, p in params.items()).backward()
        opt.step()
    faulthandler.cancel_dump_traceback_later()
    return out


def test_stage2_refuses_a_step_on_what_the_last_step_left_in_the_gradients(tmp_path):
    """Without zero_grad() between steps, torch steps on the gradients left in .grad (plus a new backward's).
    Stage 2 has summed them onto their owners and averaged the owned range, so what is left is no longer the
    gradient: the second step used a norm of 11.7 where torch's sum gave 10.2, silently. Refused on every rank."""
    for out in run_ranks(_steps_without_zero_grad, 2, tmp_path=tmp_path):
        for case in ("backward again", "step again"):
            assert "still holds the gradient the last step reduced (no zero_grad() between the steps)" in out[case], out
            assert out[case + " unchanged"], case


def test_a_shard_state_dict_loaded_into_a_plain_optimizer_says_what_it_is():
    """A 2-rank Lightning DDP run with ShardedOptimizer resumed on one device without it: the plain optimizer
    said "param_groups[0] must be a dict with a 'params' list", not what the dict is (outside probe)."""
    model = torch.nn.Linear(64, 64)
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-3, min_8bit_size=0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    plain = dist8.AdamW8bit(model.named_parameters(), lr=1e-3, min_8bit_size=0)
    with pytest.raises(ValueError, match=r"^state_dict is one rank's shard of a ShardedOptimizer \(rank 0 of 1\), "
                                         r"not a whole optimizer's: .*ShardedOptimizer\(full_state_dict=True\)"):
        plain.load_state_dict(opt.state_dict())
    assert not plain.state
    plain.load_state_dict(opt.consolidated_state_dict())  # the unsharded format loads
