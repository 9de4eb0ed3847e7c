"""bitsandbytes parity: code written for ``bitsandbytes.optim``/``functional`` works after a name swap.

* every non-paged bitsandbytes optimizer name is importable from ``dist8`` and
  ``dist8.optim``, with bitsandbytes' 8/32-bit defaults; ``is_paged=True`` is refused clearly;
* ``GlobalOptimManager`` (``get_instance``, ``register_parameters``, ``override_config``,
  ``register_module_override``): the Hugging Face "embeddings in 32 bits" recipe gives the
  same 8/32-bit decisions as in bitsandbytes, also through ``ShardedOptimizer``;
* ``bnb.nn.Embedding`` and ``StableEmbedding`` are in ``dist8.nn``: same init, output and 32-bit state;
* ``create_dynamic_map(signed, max_exponent_bits)`` equals bitsandbytes' for every value
  bitsandbytes accepts (incl. ``max_exponent_bits=8``); ``dequantize_blockwise(out_dtype=)``
  returns the dtype asked for, with bitsandbytes' values.
"""
import pytest
import torch

import dist8
from dist8.nn import StableEmbedding
from dist8.optim.config import OVERRIDE_ATTR
from dist8.quant import create_dynamic_map, dequantize_blockwise, quantize_blockwise

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [test] extras; parity needs it")

BNB_NAMES = [n for n in dir(bnb.optim) if n[0].isupper() and not n.startswith("Paged")
             and n not in ("GlobalOptimManager", "PytorchLARS")]


@pytest.fixture
def manager():
    mng = dist8.optim.GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()  # takes its marks back off the parameters


# ---- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BNB_NAMES)
def test_every_bitsandbytes_optimizer_name_is_in_dist8(name):
    cls = getattr(dist8, name)
    assert cls is getattr(dist8.optim, name) and name in dist8.__all__
    p = torch.nn.Parameter(torch.randn(5000))
    bits = 8 if name.endswith("8bit") else 32  # bnb: X8bit is 8-bit, X and X32bit are 32-bit by default
    p.grad = torch.randn(5000)
    extra = {"momentum": 0.9} if name.startswith(("SGD", "LARS")) else {}  # bnb refuses them without, too
    opt = cls([p], lr=1e-3, **extra)
    opt.step()
    assert opt.state[p]["state1"].dtype == (torch.uint8 if bits == 8 else torch.float32)


def test_paged_optimizers_are_refused_clearly():
    """bitsandbytes' Paged* classes (QLoRA's paged_adamw_8bit) import from dist8 and dist8.optim as
    bitsandbytes-style code expects; building one, or is_paged=True, is one line naming what to use."""
    import dist8.optim

    paged = sorted(n for n in dir(bnb.optim) if n.startswith("Paged"))
    assert paged and sorted(dist8.PAGED_NAMES) == paged
    for name in paged:
        for module in (dist8, dist8.optim):
            with pytest.raises(ValueError, match=rf"^dist8\.{name}: dist8 has no paged optimizers .*: "
                                                 rf"use dist8\.{name[len('Paged'):]}$"):
                getattr(module, name)([torch.nn.Parameter(torch.randn(10))], lr=1e-3)
    with pytest.raises(ValueError, match=r"^AdamW8bit\(is_paged=True\): .*use AdamW8bit\(is_paged=False\)"):
        dist8.AdamW8bit([torch.nn.Parameter(torch.randn(10))], is_paged=True)
    # by name (a DeepSpeed config's "type": "dist8.PagedAdamW8bit", the training job's optimizer.name)
    with pytest.raises(ValueError, match=r"^'dist8.PagedAdamW8bit': dist8 has no paged .*use dist8\.AdamW8bit$"):
        dist8.get_optimizer_class("dist8.PagedAdamW8bit")


# ---- GlobalOptimManager -------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, 64)
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.emb(x))))


def _train_one_step(model, opt):
    x = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    opt.step()


def _state_bits(opt, model):
    return {n: 8 if opt.state[p]["state1"].dtype == torch.uint8 else 32 for n, p in model.named_parameters()}


def test_manager_is_a_singleton_like_bitsandbytes():
    assert dist8.GlobalOptimManager.get_instance() is dist8.optim.GlobalOptimManager.get_instance()
    with pytest.raises(RuntimeError, match="get_instance"):
        dist8.GlobalOptimManager()


def test_hf_embedding_recipe_decides_like_bitsandbytes(manager):
    """transformers' Trainer recipe: optimizer first, then 32-bit overrides for every Embedding."""
    decisions = {}
    for lib, cls in (("bnb", bnb.optim.Adam8bit), ("dist8", dist8.Adam8bit)):
        mng = bnb.optim.GlobalOptimManager.get_instance() if lib == "bnb" else manager
        model = Net()
        opt = cls(model.parameters(), lr=1e-3, min_8bit_size=4096)
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                mng.register_module_override(module, "weight", {"optim_bits": 32})
        _train_one_step(model, opt)
        decisions[lib] = _state_bits(opt, model)
        if lib == "bnb":
            mng.initialize()
    assert decisions["dist8"] == decisions["bnb"]
    assert decisions["dist8"]["emb.weight"] == 32 and decisions["dist8"]["fc1.weight"] == 8


def test_override_config_before_and_after_construction(manager):
    model = Net()
    manager.register_parameters(model.parameters())  # bnb's step 1: accepted, nothing needed
    manager.override_config(model.fc1.weight, "optim_bits", 32)
    opt = dist8.Adam8bit(model.parameters(), lr=1e-3)
    manager.override_config([model.fc2.weight], key_value_dict={"optim_bits": 32, "lr": 0.0})
    before = model.fc2.weight.detach().clone()
    _train_one_step(model, opt)
    bits = _state_bits(opt, model)
    assert bits["fc1.weight"] == 32 and bits["fc2.weight"] == 32 and bits["emb.weight"] == 8
    assert torch.equal(model.fc2.weight.detach(), before)  # lr=0 reached the update
    assert manager.pid2config[id(model.fc2.weight)] == {"optim_bits": 32, "lr": 0.0}


def test_manager_override_travels_into_sharded_optimizer(manager):
    model = Net()
    manager.register_module_override(model.emb, "weight", {"optim_bits": 32})
    opt = dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-3)
    _train_one_step(model, opt)
    kinds = {name: st["state1"].dtype for name, st in
             zip([opt.inner.param_name(p) for p in opt.inner.state], opt.inner.state.values())}
    assert kinds["emb.weight"] == torch.float32 and kinds["fc1.weight"] == torch.uint8


def test_manager_refuses_unknown_keys_and_initialize_takes_marks_back(manager):
    model = Net()
    with pytest.raises(ValueError, match="skip_zeros"):
        manager.override_config(model.fc1.weight, "skip_zeros", True)
    emb = StableEmbedding(10, 8)
    own = getattr(emb.weight, OVERRIDE_ATTR)
    manager.override_config(emb.weight, "lr", 0.5)
    assert getattr(emb.weight, OVERRIDE_ATTR) == dict(own, lr=0.5)
    assert own == {"optim_bits": 32} or "lr" not in own  # the module's own mark is not mutated
    manager.override_config(model.fc1.weight, "optim_bits", 32)
    manager.initialize()
    assert getattr(emb.weight, OVERRIDE_ATTR) is own and not hasattr(model.fc1.weight, OVERRIDE_ATTR)


# ---- functional -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Embedding", "StableEmbedding"])
def test_bitsandbytes_embeddings_are_in_dist8_nn(name):
    """``bnb.nn.Embedding`` / ``StableEmbedding`` -> ``dist8.nn``: the same initial weights for the
    same seed, the same output, and 32-bit optimizer state for the weight (an ``nn.Embedding`` of
    the same size gets 8-bit state)."""
    kw = dict(padding_idx=3)
    torch.manual_seed(0)
    ours = getattr(dist8.nn, name)(5000, 16, **kw)
    torch.manual_seed(0)
    theirs = getattr(bnb.nn, name)(5000, 16, **kw)
    assert torch.equal(ours.weight, theirs.weight) and float(ours.weight.detach()[3].abs().sum()) == 0.0
    ids = torch.tensor([[1, 3, 4999], [0, 2, 7]])
    assert torch.equal(ours(ids), theirs(ids))
    plain = torch.nn.Embedding(5000, 16)
    opt = dist8.AdamW8bit(list(ours.parameters()) + list(plain.parameters()))
    (ours(ids).sum() + plain(ids).sum()).backward()
    opt.step()
    assert opt.state[ours.weight]["state1"].dtype == torch.float32
    assert opt.state[plain.weight]["state1"].dtype == torch.uint8
    with pytest.raises(ValueError, match=rf"^{name}: embedding_dim must be an int > 0, got 0"):
        getattr(dist8.nn, name)(5000, 0)


@pytest.mark.parametrize("name", ["Embedding", "StableEmbedding"])
def test_bitsandbytes_embeddings_take_their_arguments_in_bitsandbytes_order(name):
    """Every argument bitsandbytes' embedding takes by position lands in the same place here. The
    constructors passed ``*args`` on to torch's, whose ninth is ``_freeze`` where bitsandbytes has
    ``device``: ``StableEmbedding(n, d, None, None, 2.0, False, False, None, "cpu")`` failed (device as
    ``_freeze``, dtype as device); ``help()`` showed ``*args, **kwargs``."""
    import inspect

    ours, theirs = (list(inspect.signature(getattr(lib.nn, name).__init__).parameters.values())
                    for lib in (dist8, bnb))
    positional = [p.name for p in ours if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional[: len(theirs)] == [p.name for p in theirs]
    assert [p.name for p in ours if p.kind == p.KEYWORD_ONLY] == ["_freeze"]  # torch's, not bitsandbytes'
    args = (None, None, 2.0, False, False, None, "cpu") + ((torch.bfloat16,) if name == "StableEmbedding" else ())
    emb = getattr(dist8.nn, name)(10, 4, *args)
    assert emb.weight.device.type == "cpu" and emb.weight.requires_grad
    assert emb.weight.dtype == (torch.bfloat16 if name == "StableEmbedding" else torch.float32)
    frozen = getattr(dist8.nn, name).from_pretrained(torch.ones(3, 4))  # torch passes _freeze by keyword
    assert not frozen.weight.requires_grad and getattr(frozen.weight, OVERRIDE_ATTR) == {"optim_bits": 32}


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("max_exponent_bits", range(1, 9))
def test_create_dynamic_map_equals_bitsandbytes(signed, max_exponent_bits):
    try:
        expected = bnb.functional.create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits)
    except AssertionError:  # bitsandbytes cannot build this one (unsigned, < 7 or 8 bits)
        expected = None
    if expected is None and max_exponent_bits == 8:
        with pytest.raises(ValueError, match="max_exponent_bits"):
            create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits)
        return
    got = create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits)
    assert got.dtype == torch.float32 and got.numel() == 256
    assert bool((got[1:] >= got[:-1]).all())
    if expected is not None:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_blockwise_out_dtype(dtype):
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    qmap = create_dynamic_map(signed=True)
    codes, absmax = quantize_blockwise(x, qmap, block_size=256)
    out = dequantize_blockwise(codes, absmax, qmap, block_size=256, out_dtype=x.dtype)
    assert out.dtype == dtype and out.shape == x.shape
    ref = dequantize_blockwise(codes, absmax, qmap, block_size=256)
    assert ref.dtype == torch.float32 and torch.equal(out, ref.to(dtype))
    theirs = bnb.functional.dequantize_blockwise(codes, absmax=absmax, code=qmap, blocksize=256)
    assert torch.equal(ref, theirs)
    with pytest.raises(TypeError, match="out_dtype"):
        dequantize_blockwise(codes, absmax, qmap, out_dtype=torch.int32)
