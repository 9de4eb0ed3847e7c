"""Per-parameter settings (marks) that survive new parameter objects.

dist8.nn.Embedding / StableEmbedding keep their weight's optimizer state in 32 bits, and
GlobalOptimManager's overrides apply, although the weight was replaced after they were set: by
torch's own ``fully_shard`` (DTensors), ``emb.weight = ...`` (tying, Hugging Face's
``resize_token_embeddings`` under ZeRO-3), ``copy.deepcopy``, ``load_state_dict(assign=True)`` or a
swap. bitsandbytes resolves module overrides through the module at the first step, and applies
``register_parameters``' overrides by position; dist8 does the same.
"""
import copy
import gc
import weakref

import pytest
import torch
from dist_utils import run_ranks

import dist8
from dist8.nn import Embedding, StableEmbedding
from dist8.optim.config import OVERRIDE_ATTR
from dist8.optim.manager import apply_positional_configs


@pytest.fixture
def manager():
    mng = dist8.GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


def _model(emb_cls=StableEmbedding):
    torch.manual_seed(0)
    return torch.nn.Sequential(emb_cls(300, 64), torch.nn.Linear(64, 300))


def _step(model, **kw):
    """One AdamW8bit step built on ``model`` now; returns the optimizer."""
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, **kw)
    model(torch.randint(0, 300, (4, 8))).float().sum().backward()
    opt.step()
    return opt


def _bits(opt, p):
    return 8 if opt.state[p]["state1"].dtype == torch.uint8 else 32


# ---- torch's fully_shard: DTensor parameters in place of the marked ones ------------------------
def _torch_fully_shard_worker(rank, world_size):
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist8.integrations import fsdp as d8fsdp

    warnings.filterwarnings("ignore")
    mesh = init_device_mesh("cpu", (world_size,))
    mng = dist8.GlobalOptimManager.get_instance()
    mng.initialize()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.emb = StableEmbedding(300, 64), Embedding(300, 64)
            self.plain, self.fc = torch.nn.Embedding(300, 64), torch.nn.Linear(64, 128)
            self.head = torch.nn.Linear(128, 300)

        def forward(self, x):
            return self.head(self.fc(self.tok(x) + self.emb(x) + self.plain(x)))

    prepared = Model()
    fully_shard(prepared, mesh=mesh)
    d8fsdp.prepare(prepared)  # marks the dist8.nn.Embedding's new weight too, not only StableEmbedding's
    out = {"prepare marked emb.weight": getattr(prepared.emb.weight, OVERRIDE_ATTR, None)}

    torch.manual_seed(0)
    model = Model()
    mng.register_module_override(model.plain, "weight", {"optim_bits": 32})
    mng.override_config(model.fc.weight, "optim_bits", 32)  # a tensor's: kept by register_parameters only
    mng.register_parameters(model.parameters())
    fully_shard(model, mesh=mesh)  # no prepare(): the optimizer restores the marks when built
    groups = [{"params": list(model.parameters())}]
    apply_positional_configs(groups)  # dist8.optim.base runs this when built (see the test at the end)
    opt = dist8.AdamW8bit(groups, lr=1e-2)
    model(torch.randint(0, 300, (2, 8))).sum().backward()
    opt.step()
    out.update({n: str(opt.state[p]["state1"].dtype) for n, p in model.named_parameters() if n.endswith("weight")})
    mng.initialize()
    return out


def test_torch_fully_shard_keeps_embedding_and_module_marks(tmp_path):
    res = run_ranks(_torch_fully_shard_worker, 2, tmp_path=tmp_path)[0]
    assert res["prepare marked emb.weight"] == {"optim_bits": 32}
    for name in ("tok.weight", "emb.weight", "plain.weight", "fc.weight"):
        assert res[name] == "torch.float32", (name, res)
    assert res["head.weight"] == "torch.uint8", res


# ---- the weight replaced ---------------------------------------------------------------------------
@pytest.mark.parametrize("emb_cls", [Embedding, StableEmbedding])
@pytest.mark.parametrize("how", ["new Parameter", "tied to the head", "ZeRO-3 resize", "register_parameter"])
def test_replaced_embedding_weight_keeps_32bit_state(emb_cls, how):
    model = _model(emb_cls)
    emb, head = model
    if how == "new Parameter":
        emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    elif how == "tied to the head":
        emb.weight = head.weight
    elif how == "ZeRO-3 resize":  # transformers' resize_token_embeddings: old_embeddings.weight = new_embeddings.weight
        emb.weight = torch.nn.Embedding(310, 64).weight
    else:  # no __setattr__ (as torch's fully_shard): restored when the optimizer is built
        emb.register_parameter("weight", torch.nn.Parameter(emb.weight.detach().clone()))
    opt = _step(model)
    assert getattr(emb.weight, OVERRIDE_ATTR) == {"optim_bits": 32}
    assert _bits(opt, emb.weight) == 32
    if how != "tied to the head":
        assert _bits(opt, head.weight) == 8


@pytest.mark.parametrize("emb_cls", [Embedding, StableEmbedding])
def test_deepcopy_keeps_embedding_32bit_state(emb_cls):
    model = copy.deepcopy(_model(emb_cls))  # Parameter.__deepcopy__ copies no attributes
    opt = _step(model)
    assert _bits(opt, model[0].weight) == 32 and _bits(opt, model[1].weight) == 8


def test_embedding_registry_holds_modules_weakly():
    emb = Embedding(300, 64)
    ref = weakref.ref(emb)
    del emb
    gc.collect()
    assert ref() is None


# ---- manager overrides beside the embedding's own mark ---------------------------------------------
def test_module_override_survives_load_state_dict_assign(manager):
    model = _model()
    manager.register_module_override(model[0], "weight", {"lr": 0.0})
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    before = model[0].weight.detach().clone()
    opt = _step(model)
    assert _bits(opt, model[0].weight) == 32
    assert torch.equal(model[0].weight.detach(), before)  # lr=0 applied


def test_override_config_survives_a_swap_after_construction(manager):
    model = _model()
    manager.override_config(model[0].weight, "lr", 0.0)
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to(torch.float64).to(torch.float32)  # swap_tensors: the weight's attributes are exchanged
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    before = model[0].weight.detach().clone()
    model(torch.randint(0, 300, (4, 8))).sum().backward()
    opt.step()
    assert getattr(model[0].weight, OVERRIDE_ATTR) == {"optim_bits": 32, "lr": 0.0}
    assert _bits(opt, model[0].weight) == 32
    assert torch.equal(model[0].weight.detach(), before)


def test_override_set_after_a_replacement_wins_over_the_embeddings_own(manager):
    model = _model()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    manager.override_config(model[0].weight, "optim_bits", 8)
    opt = _step(model, min_8bit_size=0)
    assert _bits(opt, model[0].weight) == 8


# ---- register_parameters: overrides by position ----------------------------------------------------
def _registered_mlp(manager):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    manager.override_config(model[0].weight, "optim_bits", 32)
    manager.register_parameters(model.parameters())
    return model


def _mlp_step(opt, model):
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return {n: _bits(opt, p) for n, p in model.named_parameters() if n.endswith("weight")}


def test_register_parameters_applies_by_position(manager):
    copied = copy.deepcopy(_registered_mlp(manager))  # new parameter objects, unmarked
    assert manager.positional_config(0, 0) == {"optim_bits": 32} and manager.positional_config(0, 2) is None
    groups = [{"params": list(copied.parameters())}]
    apply_positional_configs(groups)
    assert _mlp_step(dist8.AdamW8bit(groups, lr=1e-3), copied) == {"0.weight": 32, "1.weight": 8}
    manager.initialize()  # takes the positional marks back, as its other marks
    assert not hasattr(copied[0].weight, OVERRIDE_ATTR)


def test_register_parameters_applied_when_the_optimizer_is_built(manager):
    """Needs ``apply_positional_configs(groups)`` in ``Optimizer8bit.__init__`` (dist8/optim/base.py)."""
    copied = copy.deepcopy(_registered_mlp(manager))
    opt = dist8.AdamW8bit(copied.parameters(), lr=1e-3)
    assert _mlp_step(opt, copied) == {"0.weight": 32, "1.weight": 8}  # as bitsandbytes decides


def test_register_parameters_applied_by_a_sharded_optimizer_at_the_users_positions(manager):
    """ShardedOptimizer's inner optimizer lists pieces, not the user's parameters: the positions recorded by
    ``register_parameters`` are applied to the user's groups before the marks are copied onto the pieces."""
    from dist8.shard import ShardedOptimizer

    copied = copy.deepcopy(_registered_mlp(manager))
    opt = ShardedOptimizer(copied.parameters(), dist8.AdamW8bit, lr=1e-3)
    copied(torch.randn(2, 64)).sum().backward()
    opt.step()
    first, second = opt.state[copied[0].weight], opt.state[copied[1].weight]
    assert first["state1"].dtype == torch.float32 and second["state1"].dtype == torch.uint8


def test_override_config_after_the_first_step_reaches_a_sharded_optimizers_pieces(manager):
    """The pieces had their parameters' marks copied at construction: an override made after the first step
    applied on the unsharded optimizer (as in bitsandbytes) but not on ShardedOptimizer."""
    from dist8.shard import ShardedOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    opt = ShardedOptimizer(model.parameters(), dist8.AdamW8bit, lr=1e-2)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    manager.override_config(model[0].weight, "lr", 0.0)
    frozen, other = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 64)).sum().backward()
        opt.step()
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[1].weight, other)
