"""Checkpoint names without the wrappers around the model (:mod:`dist8.checkpoint.names`).

Before, ``dist8.checkpoint.save(path, torch.compile(model), opt)`` named every parameter
``_orig_mod.<name>`` (and DDP ``module.<name>``): the checkpoint loaded only into the same wrapping,
and a compiled FSDP2 model was saved with no optimizer state at all (torch's full state dict names
drop the wrappers, so every lookup missed), silently.
"""
import json
import os

import pytest
import torch
from torch import nn

import dist8
import dist8.checkpoint as ck
from dist_utils import run_ranks


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(32, 300), nn.GELU())
        self.module = nn.Linear(300, 8)  # a child of the user's that happens to be called "module": kept

    def forward(self, x):
        return self.module(self.body(x))


PLAIN = ["body.0.weight", "body.0.bias", "module.weight", "module.bias"]


def run(model, opt, first, last, rank=0):
    for s in range(first, last):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * s + rank))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def saved_names(path):
    meta = json.load(open(os.path.join(path, "metadata.json")))
    return [p["name"] for p in meta["params"]], {p["name"]: p["state"] for p in meta["params"]}


def checkpoint_wrapped(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model.body = checkpoint_wrapper(model.body)
    return model


def test_compiled_and_checkpoint_wrapped_models_save_plain_names_and_load_across_wrappings(tmp_path):
    model = Net()
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    run(model, opt, 0, 2)
    wrapped = torch.compile(checkpoint_wrapped(model))  # not run: only its names matter here
    assert next(iter(dict(wrapped.named_parameters()))) == "_orig_mod.body._checkpoint_wrapped_module.0.weight"
    path = ck.save(tmp_path / "c", wrapped, opt, step=2)
    names, _ = saved_names(path)
    assert names == PLAIN
    for target in ("plain", "compiled"):
        fresh = Net(seed=5)
        fresh_opt = dist8.AdamW8bit(fresh.parameters(), lr=1e-2, min_8bit_size=0)
        ck.load(path, torch.compile(fresh) if target == "compiled" else fresh, fresh_opt)
        run(fresh, fresh_opt, 2, 4)
        if target == "plain":
            run(model, opt, 2, 4)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters())), target


def test_a_checkpoint_with_wrapped_names_still_loads_into_the_same_wrapping(tmp_path, monkeypatch):
    import dist8.checkpoint.names as names

    model = Net()
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    run(model, opt, 0, 2)
    monkeypatch.setattr(names, "_plain", lambda model, name: name)  # how checkpoints were named before
    path = ck.save(tmp_path / "old", torch.compile(model), opt, step=2)
    monkeypatch.undo()
    assert saved_names(path)[0] == ["_orig_mod." + n for n in PLAIN]
    fresh = Net(seed=5)
    fresh_opt = dist8.AdamW8bit(fresh.parameters(), lr=1e-2, min_8bit_size=0)
    ck.load(path, torch.compile(fresh), fresh_opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    assert all(torch.equal(opt.state[p]["state1"], fresh_opt.state[q]["state1"])
               for p, q in zip(model.parameters(), fresh.parameters()))
    plain = Net()  # old names need the old wrapping: refused naming the parameter, as any other mismatch
    with pytest.raises(ck.CheckpointError, match="parameter body.0.weight is not in the checkpoint"):
        ck.load(path, plain, dist8.AdamW8bit(plain.parameters()))


def _wrapped_save(rank, world_size, path, kind):
    model = Net()
    if kind == "fsdp2 + compile":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
        run(model, opt, 0, 2, rank)
        ck.save(path, torch.compile(model), opt, step=2)
        return {n: p.full_tensor() for n, p in model.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = dist8.ShardedOptimizer(ddp.named_parameters(), dist8.AdamW8bit, stage=1, lr=1e-2, min_8bit_size=0)
    run(ddp, opt, 0, 2, rank)
    ck.save(path, ddp, opt, step=2)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["ddp", "fsdp2 + compile"])
def test_wrapped_models_on_two_ranks_save_their_state_under_plain_names_and_load_on_one(tmp_path, kind):
    path = str(tmp_path / "c")
    trained = run_ranks(_wrapped_save, 2, path, kind, tmp_path=tmp_path)[0]
    names, states = saved_names(path)
    assert names == PLAIN and all(states[n] for n in names), states  # the optimizer state is there
    fresh = Net(seed=5)
    opt = dist8.AdamW8bit(fresh.parameters(), lr=1e-2, min_8bit_size=0)
    ck.load(path, fresh, opt)
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())
    assert all(opt.state[p]["step"] == 2 for p in fresh.parameters())


def test_fp32_weights_keyed_by_a_compiled_model_or_without_a_tied_name_load(tmp_path):
    from test_checkpoint_tied import TiedLM

    model = Net()
    compiled_keys = torch.compile(Net(seed=3)).state_dict()
    assert next(iter(compiled_keys)).startswith("_orig_mod.")
    ck.load_fp32_weights(compiled_keys, torch.compile(model))  # keyed like the model passed, wrappers and all
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), Net(seed=3).parameters()))
    tied = TiedLM()
    hf_style = {n: t for n, t in TiedLM(seed=3).state_dict().items() if n != "head.weight"}  # stored once
    ck.load_fp32_weights(hf_style, tied)
    assert torch.equal(tied.head.weight, hf_style["emb.weight"]) and tied.head.weight is tied.emb.weight
    with pytest.raises(ck.CheckpointError, match="model tensor mid.bias is missing"):
        ck.load_fp32_weights({n: t for n, t in hf_style.items() if n != "mid.bias"}, tied)


def test_a_meta_model_and_non_tensor_extra_state_are_refused_in_one_line(tmp_path):
    model = Net()
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    run(model, opt, 0, 1)
    path = ck.save(tmp_path / "c", model, opt, step=1)
    with torch.device("meta"):
        on_meta = Net()
    with pytest.raises(ck.CheckpointError, match=r"parameter body.0.weight is on the meta device; materialize"):
        ck.load(path, on_meta, dist8.AdamW8bit(on_meta.parameters()))
    on_meta.body[0].weight = nn.Parameter(torch.zeros(300, 32))  # the optimizer's are real, a model tensor is not
    with pytest.raises(ck.CheckpointError, match=r"model tensor body.0.bias is on the meta device"), \
            pytest.warns(UserWarning, match="checkpoint parameter body.0.bias is not in the optimizer"):
        ck.load(path, on_meta, dist8.AdamW8bit([on_meta.body[0].weight]), strict=False)

    class WithExtraState(nn.Linear):
        def get_extra_state(self):
            return {"scale": 1.0}

        def set_extra_state(self, state):
            pass

    odd = nn.Sequential(WithExtraState(4, 4))
    with pytest.raises(TypeError, match=r"model state entry 0._extra_state is a dict, not a tensor"):
        ck.save(tmp_path / "c", odd, dist8.AdamW8bit(odd.parameters()), step=1)
    fresh = Net()
    # the earlier checkpoint is intact
    assert ck.load(path, fresh, dist8.AdamW8bit(fresh.parameters(), min_8bit_size=0)) == {}
