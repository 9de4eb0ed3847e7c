"""Tied weights in dist8 checkpoints (GPT-2's and Llama's ``lm_head.weight`` is the token embedding).

safetensors refuses tensors that share memory, so ``dist8.checkpoint.save`` of such a model failed
outright; the model file now stores a tied tensor once and names its aliases in the header
(:mod:`dist8.checkpoint.model_file`), for the plain optimizer, ``ShardedOptimizer``, FSDP2, and the
fp32 weights of ``dist8 ckpt consolidate --fp32-weights``.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import dist8
import dist8.checkpoint as ck
from dist8.checkpoint.convert import consolidate
from dist8.optim.state_schema import CORRECTION
from dist8.quant.master import decode_master
from dist_utils import run_ranks


class TiedLM(nn.Module):
    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(300, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 300, bias=False)
        self.head.weight = self.emb.weight
        self.to(dtype)

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x))))


def run(model, opt, first, last, rank=0):
    for s in range(first, last):
        x = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(10 * s + rank))
        nn.functional.cross_entropy(model(x).float(), (7 * x) % 300).backward()
        opt.step()
        opt.zero_grad()


def header(file):
    with safe_open(str(file), framework="pt") as f:
        return sorted(f.keys()), f.metadata()


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tied_model_saves_once_loads_tied_and_resumes_bitwise(tmp_path):
    model = TiedLM()
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2)
    run(model, opt, 0, 3)
    path = ck.save(tmp_path / "c", model, opt, step=3)
    keys, meta = header(os.path.join(path, "model.safetensors"))
    assert keys == ["emb.weight", "mid.bias", "mid.weight"]  # the tied weight once
    assert json.loads(meta["aliases"]) == {"head.weight": "emb.weight"}

    fresh = TiedLM(seed=5)
    fresh_opt = dist8.AdamW8bit(fresh.named_parameters(), lr=1e-2)
    ck.load(path, fresh, fresh_opt)
    assert fresh.head.weight is fresh.emb.weight
    run(model, opt, 3, 6)
    run(fresh, fresh_opt, 3, 6)
    resumed, uninterrupted = params_of(fresh), params_of(model)
    assert all(torch.equal(resumed[n], uninterrupted[n]) for n in uninterrupted)
    assert not torch.equal(uninterrupted["emb.weight"], params_of(TiedLM())["emb.weight"])  # it trained


def test_tied_bf16_masters_consolidate_to_fp32_weights_once_and_load_back(tmp_path):
    model = TiedLM(dtype=torch.bfloat16)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, master_weight_bits=24, min_8bit_size=0)
    run(model, opt, 0, 3)
    path = ck.save(tmp_path / "c", model, opt, step=3)
    out = consolidate(path, tmp_path / "fp32", fp32_weights_file=True)
    keys, meta = header(os.path.join(out, "model-fp32.safetensors"))
    assert "head.weight" not in keys and json.loads(meta["aliases"]) == {"head.weight": "emb.weight"}
    weights = ck.reader.read_model_tensors(os.path.join(out, "model-fp32.safetensors"))
    master = decode_master(model.emb.weight.detach(), opt.state[model.emb.weight][CORRECTION])
    assert weights["head.weight"] is weights["emb.weight"] and torch.equal(weights["emb.weight"], master)

    fresh = TiedLM(seed=5, dtype=torch.bfloat16)
    fresh_opt = dist8.AdamW8bit(fresh.named_parameters(), lr=1e-2, master_weight_bits=24, min_8bit_size=0)
    ck.load_fp32_weights(os.path.join(out, "model-fp32.safetensors"), fresh, fresh_opt)
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(decode_master(fresh.emb.weight.detach(), fresh_opt.state[fresh.emb.weight][CORRECTION]), master)


def _sharded_save(rank, world_size, path, kind):
    model = TiedLM()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-2)
    else:
        opt = dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2)
    run(model, opt, 0, 3, rank)
    ck.save(path, model, opt, step=3)
    if kind == "fsdp2":
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    return params_of(model)


@pytest.mark.parametrize("kind", ["sharded", "fsdp2"])
def test_tied_model_saved_on_two_ranks_loads_on_one(tmp_path, kind):
    path = str(tmp_path / "c")
    saved = run_ranks(_sharded_save, 2, path, kind, tmp_path=tmp_path)[0]
    fresh = TiedLM(seed=5)
    opt = dist8.AdamW8bit(fresh.named_parameters(), lr=1e-2)
    ck.load(path, fresh, opt)
    assert fresh.head.weight is fresh.emb.weight
    assert all(torch.equal(p, saved[n]) for n, p in params_of(fresh).items())


@pytest.mark.parametrize("aliases,match", [
    ("{not json", "'aliases' is not JSON"),
    ('["head.weight"]', "'aliases' must map tensor names to tensor names"),
    ('{"head.weight": 3}', "'aliases' must map tensor names to tensor names"),
    ('{"head.weight": "nowhere"}', "alias 'head.weight' names 'nowhere', which is not stored"),
    ('{"mid.weight": "emb.weight"}', "alias 'mid.weight' is also a stored tensor"),
])
def test_bad_aliases_are_refused_naming_the_file_and_change_nothing(tmp_path, aliases, match):
    from test_checkpoint_hostile import refit_file

    model = TiedLM()
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2)
    run(model, opt, 0, 2)
    path = ck.save(tmp_path / "c", model, opt, step=2)
    file = os.path.join(path, "model.safetensors")
    tensors = ck.reader.read_model_tensors(file)
    save_file({k: v.clone() for k, v in tensors.items() if k != "head.weight"}, file,
              metadata={"format": "dist8.checkpoint", "aliases": aliases})
    refit_file(path, "model.safetensors")  # an attacker who fixes the hashes too
    fresh = TiedLM(seed=5)
    fresh_opt = dist8.AdamW8bit(fresh.named_parameters(), lr=1e-2)
    before = params_of(fresh)
    with pytest.raises(ck.CheckpointError, match="model.safetensors: .*" + match.replace("[", r"\[")) as info:
        ck.load(path, fresh, fresh_opt)
    assert "\n" not in str(info.value)
    assert all(torch.equal(p, before[n]) for n, p in params_of(fresh).items()) and not fresh_opt.state


def test_fp32_weights_for_a_tied_tensor_under_both_names_load_or_are_refused_when_they_differ():
    """A Hugging Face style export writes the tied weight under both names: loaded once; two different
    values for one tied tensor are refused naming both (one would silently win)."""
    model = TiedLM(dtype=torch.bfloat16)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, master_weight_bits=24, min_8bit_size=0)
    weights = {n: t.float() + 1e-3 for n, t in TiedLM(seed=3).state_dict().items()}
    weights["head.weight"] = weights["emb.weight"].clone()
    ck.load_fp32_weights(weights, model, opt)
    once = TiedLM(dtype=torch.bfloat16)
    once_opt = dist8.AdamW8bit(once.named_parameters(), lr=1e-2, master_weight_bits=24, min_8bit_size=0)
    ck.load_fp32_weights({n: t for n, t in weights.items() if n != "head.weight"}, once, once_opt, strict=False)
    for p, q in zip(model.parameters(), once.parameters()):  # the tied weight's masters as if named once
        assert torch.equal(p, q) and torch.equal(opt.state[p][CORRECTION], once_opt.state[q][CORRECTION])
    weights["head.weight"] += 1
    before = params_of(model)
    with pytest.raises(ck.CheckpointError, match="emb.weight and head.weight are one tied tensor of the model, but "
                                                 "their values differ"):
        ck.load_fp32_weights(weights, model, opt)
    assert all(torch.equal(p, before[n]) for n, p in params_of(model).items())


def test_model_file_folds_exact_aliases_copies_overlaps_and_keeps_disjoint_views(tmp_path):
    from dist8.checkpoint.model_file import read_model_file, write_model_file

    base = torch.arange(100.0)
    tensors = {"a": base, "b": base[10:20], "c": base[50:60], "d": base, "e": torch.ones(3),
               "f": base.view(10, 10)[:, 0], "empty": torch.zeros(0),
               "x": torch.arange(30.0)[:10]}  # a view of a storage nothing else here holds
    file = tmp_path / "m.safetensors"
    write_model_file(file, tensors, {"format": "dist8.checkpoint"})
    loaded, aliases = read_model_file(file)
    assert aliases == {"d": "a"} and loaded["d"] is loaded["a"]
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())


class UntiedLM(TiedLM):
    def __init__(self, seed=0):
        super().__init__(seed)
        self.head.weight = nn.Parameter(self.emb.weight.detach().clone() + 1)


def test_an_untied_checkpoint_with_different_values_is_refused_by_a_tied_model(tmp_path):
    model = UntiedLM()
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2)
    run(model, opt, 0, 2)
    path = ck.save(tmp_path / "c", model, opt, step=2)
    tied = TiedLM(seed=5)
    tied_opt = dist8.AdamW8bit(tied.named_parameters(), lr=1e-2)
    before = params_of(tied)
    with pytest.raises(ck.CheckpointError, match="model.safetensors: emb.weight and head.weight are one tied tensor "
                                                 "of the model, but their values differ"):
        with pytest.warns(UserWarning, match="checkpoint parameter head.weight is not in the optimizer"):
            ck.load(path, tied, tied_opt, strict=False)  # strict=False skips the optimizer's missing head.weight
    assert all(torch.equal(p, before[n]) for n, p in params_of(tied).items()) and not tied_opt.state
