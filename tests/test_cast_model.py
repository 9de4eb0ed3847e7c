"""dist8.cast_model: bf16/fp16 parameters with norm layers (and chosen names) kept and computed in fp32."""
import pytest
import torch
from torch import nn

import dist8
from dist8.nn import StableEmbedding
from dist8.optim import AdamW8bit


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = StableEmbedding(50, 32)  # has a LayerNorm inside
        self.blocks = nn.ModuleList([Block(), Block()])
        self.rms = nn.RMSNorm(32)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 50)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        x = self.bn(self.rms(x).transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def dtypes(model):
    return {n: p.dtype for n, p in model.named_parameters()}


def test_norm_layers_stay_fp32_and_forward_backward_work():
    torch.manual_seed(0)
    model = dist8.cast_model(Model(), torch.bfloat16)
    d = dtypes(model)
    for n, dt in d.items():
        norm = any(k in n for k in ("norm", "rms", "bn", "emb.norm"))
        assert dt == (torch.float32 if norm else torch.bfloat16), n
    assert model.bn.running_mean.dtype == torch.float32
    idx = torch.randint(0, 50, (4, 6))
    out = model(idx)
    assert out.dtype == torch.bfloat16
    loss = nn.functional.cross_entropy(out.float().reshape(-1, 50), idx.reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())
    opt = AdamW8bit(model.named_parameters(), lr=1e-3, min_8bit_size=64)
    opt.step()  # a dist8 optimizer takes the mixed model as it is


def test_norm_output_matches_an_fp32_norm():
    torch.manual_seed(0)
    ln = nn.LayerNorm(16)
    ref = nn.LayerNorm(16)
    ref.load_state_dict(ln.state_dict())
    dist8.cast_model(ln, torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert torch.equal(ln(x), ref(x.float()).to(torch.bfloat16))


def test_patterns_modules_params_and_children():
    torch.manual_seed(0)
    model = dist8.cast_model(Model(), torch.float16, keep_fp32=["head.*", "blocks.1"], keep_norm_layers=False)
    d = dtypes(model)
    assert d["head.weight"] == d["head.bias"] == torch.float32
    assert d["blocks.1.fc.weight"] == d["blocks.1.norm.weight"] == torch.float32  # children of a kept module
    assert d["blocks.0.norm.weight"] == d["rms.weight"] == d["blocks.0.fc.weight"] == torch.float16
    out = model(torch.randint(0, 50, (2, 5)))
    assert out.dtype == torch.float16  # head computes in fp32, returns its input's dtype


def test_refusals():
    with pytest.raises(ValueError, match="dtype must be one of"):
        dist8.cast_model(Model(), torch.int8)
    with pytest.raises(ValueError, match="matches blocks.0.fc.bias but not blocks.0.fc.weight of module blocks.0.fc"):
        dist8.cast_model(Model(), torch.bfloat16, keep_fp32=["*.bias"])
    with pytest.raises(ValueError, match="dtype must be one of .*, got 'bf16'"):
        dist8.cast_model(Model(), "bf16")
    model = Model()
    with pytest.raises(ValueError, match=r"^cast_model: keep_fp32 pattern 'haed' matches no module or parameter "
                                         r"name of the model \(names look like "):
        dist8.cast_model(model, torch.bfloat16, keep_fp32=["head", "haed"])  # a typo: refused, nothing cast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for bad in (torch.ones(3), [1], ["head", None], 5):  # not name patterns: refused before anything is cast
        model = Model()
        with pytest.raises(TypeError, match="keep_fp32 must be a name pattern or a list of them"):
            dist8.cast_model(model, torch.bfloat16, keep_fp32=bad)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    for bad in ("no", None, torch.tensor(False)):  # "no" kept the norm layers (a truthy string)
        model = Model()
        with pytest.raises(ValueError, match="keep_norm_layers must be True or False"):
            dist8.cast_model(model, torch.bfloat16, keep_norm_layers=bad)
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_stable_embedding_refuses_bad_sizes_naming_them():
    for args, key in (((-1, 8), "num_embeddings"), ((10, 0), "embedding_dim"), ((torch.ones(3), 8), "num_embeddings"),
                      ((10, 2.5), "embedding_dim"), ((True, 8), "num_embeddings")):
        with pytest.raises(ValueError, match=f"StableEmbedding: {key} must be an int > 0") as info:
            dist8.nn.StableEmbedding(*args)
        assert "\n" not in str(info.value)
    assert dist8.nn.StableEmbedding(10, 8, padding_idx=0).weight.shape == (10, 8)


def test_idempotent_and_fp32_is_a_no_op():
    torch.manual_seed(0)
    model = Model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    dist8.cast_model(model, torch.float32)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    dist8.cast_model(model, torch.bfloat16)
    dist8.cast_model(model, torch.bfloat16)
    assert len(model.blocks[0].norm._forward_pre_hooks) == 1


class LlamaStyleRMSNorm(nn.Module):  # transformers writes its norms as own classes, computing in fp32 inside
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)


class LayerNormLinear(nn.Linear):  # a fused layer: its matrix is not a norm's scale
    pass


class PreNorm(nn.Module):  # a container: kept, its fn would compute in fp32 with bf16 weights
    def __init__(self, d, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(d), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Normalizer(nn.Module):  # "Normal..." is not a norm
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.scale


def test_norm_classes_of_other_libraries_are_kept():
    """A norm layer written as its own class (transformers' LlamaRMSNorm, T5LayerNorm ...) stays fp32 like
    torch's; look-alikes that are not norms (a fused matrix, a container, "Normal...") are cast."""
    torch.manual_seed(0)
    model = nn.Sequential(LlamaStyleRMSNorm(16), LayerNormLinear(16, 16), PreNorm(16, nn.Linear(16, 16)),
                          Normalizer(16))
    assert [dist8.nn.is_norm_layer(m) for m in model] == [True, False, False, False]
    dist8.cast_model(model, torch.bfloat16)
    d = dtypes(model)
    assert d["0.weight"] == d["2.norm.weight"] == torch.float32
    assert d["1.weight"] == d["2.fn.weight"] == d["3.scale"] == torch.bfloat16
    assert dist8.nn.is_kept_fp32(model[0]) and not dist8.nn.is_kept_fp32(model[2])
    out = model(torch.randn(2, 16).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    dist8.AdamW8bit(model.parameters(), lr=1e-3, master_weight_bits=24).step()


@pytest.mark.parametrize("arch", ["llama", "t5", "gemma2", "mamba"])
def test_transformers_norm_layers_stay_fp32(arch):
    """transformers' RMSNorm / T5LayerNorm classes are kept like nn.LayerNorm (before: all cast to bf16).
    Mamba casts the norm's input to the norm's weight dtype (fp32 now): the kept norm still returns bf16."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    build = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, num_key_value_heads=1)),
        "gemma2": lambda: transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(**small, num_key_value_heads=1, head_dim=16)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)),
        "mamba": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8)),
    }[arch]
    torch.manual_seed(0)
    model = dist8.cast_model(build(), torch.bfloat16)
    norms = {n: p.dtype for n, p in model.named_parameters() if "norm" in n}
    assert norms and set(norms.values()) == {torch.float32}, norms
    assert {p.dtype for n, p in model.named_parameters() if n not in norms} == {torch.bfloat16}
    ids = torch.randint(0, 64, (2, 8))
    extra = {"decoder_input_ids": ids[:, :4]} if arch == "t5" else {}
    model(input_ids=ids, **extra).logits.float().square().mean().backward()
    dist8.AdamW8bit(model.parameters(), lr=1e-3, master_weight_bits=24).step()


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.emb.weight  # GPT-2's tied output head

    def forward(self, idx):
        return self.head(self.body(self.emb(idx)))


def test_kept_embedding_returns_the_cast_dtype_and_tied_weights_are_kept_together():
    """keep_fp32=["emb"]: an embedding's input has no floats, so its fp32 rows met the next bf16 layer with
    a dtype mismatch. keep_fp32=["head"] on a head tied to the embedding (one tensor) kept it fp32 while the
    embedding's module computed in bf16: the first forward failed naming neither; now refused at once."""
    torch.manual_seed(0)
    model = dist8.cast_model(TiedLM(), torch.bfloat16, keep_fp32=["emb", "head"])
    assert model.emb.weight.dtype == torch.float32 and model.body.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 50, (2, 6)))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    dist8.AdamW8bit(model.parameters(), lr=1e-3, master_weight_bits=24).step()

    model = TiedLM()
    with pytest.raises(ValueError, match=r"^cast_model: head.weight is kept fp32 but is the same tensor as emb.weight "
                                         r"\(tied weights\), whose module is cast to bfloat16: keep both modules"):
        dist8.cast_model(model, torch.bfloat16, keep_fp32=["head"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # refused before anything was cast


def _recast_with_lightning_bf16_true(model):
    from lightning.fabric.plugins.precision import HalfPrecision
    return HalfPrecision("bf16-true").convert_module(model)  # what Fabric/Trainer(precision="bf16-true") call


@pytest.mark.parametrize("recast, dtype", [
    (lambda m: m.float(), torch.float32), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    (lambda m: m.half(), torch.float16), (lambda m: m.double(), torch.float64),
    (_recast_with_lightning_bf16_true, torch.bfloat16)], ids=["float", "to-bf16", "half", "double", "lightning-bf16-true"])
def test_a_cast_model_cast_again_as_a_whole_runs_like_a_plain_model_of_that_dtype(recast, dtype):
    """``model.float()`` (to evaluate or export), ``.to(torch.bfloat16)``, ``.half()`` or Lightning's
    ``bf16-true`` after cast_model: the kept modules are cast with the rest, and their hooks now follow
    (they cast the output to the dtype cast_model had used, or the input to fp32: every one of these
    failed at the first forward with a dtype mismatch naming nothing). The result is bitwise a plain
    model of that dtype with the same weights."""
    torch.manual_seed(0)
    model = dist8.cast_model(Model(), torch.bfloat16)
    plain = Model()
    plain.load_state_dict(model.state_dict())
    model = recast(model)
    plain = plain.to(dtype)
    model.eval(), plain.eval()
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out, expected = model(idx), plain(idx)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_a_block_copied_out_of_a_cast_model_follows_its_own_casts():
    """What the kept modules read the model's dtype from travels with them (an empty buffer, not in
    ``state_dict``): a block deep-copied out of the cast model and cast to fp32 runs in fp32, the
    model it came from still in bf16."""
    import copy

    torch.manual_seed(0)
    model = dist8.cast_model(Model(), torch.bfloat16)
    assert not any("_dist8" in k for k in model.state_dict())
    block = copy.deepcopy(model.blocks[0]).float()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert block(x).dtype == torch.float32
        assert model.blocks[0](x.bfloat16()).dtype == torch.bfloat16
        assert model(torch.randint(0, 50, (2, 7))).dtype == torch.bfloat16
