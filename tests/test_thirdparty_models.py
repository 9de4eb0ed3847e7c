"""cast_model + forward + backward + AdamW8bit(master_weight_bits=24) on models nobody here wrote.

FlashOptim runs its cast_model over a sweep of third-party architectures (its
``test/test_thirdparty.py``); this is that sweep for dist8, on tiny configs built without downloads:
encoders, decoders with RMSNorm classes of their own, encoder-decoders, a state-space model, a
mixture of experts, vision transformers and a CNN with BatchNorm. It found two failures our own
models never showed: transformers' norm classes were cast to bf16 (now kept fp32 like
``nn.LayerNorm``), and Mamba, which casts its norm's input to the norm's weight dtype, then failed
with a dtype mismatch (a kept module now returns the model's dtype for an fp32 input).
"""
import pytest
import torch

import dist8
from dist8.nn import is_norm_layer

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def _ids(b=2, s=16):
    return torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(0))


def _pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


T = transformers
MODELS = {
    "bert": (lambda: T.BertModel(T.BertConfig(**SMALL)),
             lambda: dict(input_ids=_ids(), attention_mask=torch.ones(2, 16, dtype=torch.long))),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0,
                                                    eos_token_id=0)), lambda: dict(input_ids=_ids())),
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=1)), lambda: dict(input_ids=_ids())),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=1)), lambda: dict(input_ids=_ids())),
    "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**SMALL, num_key_value_heads=1, head_dim=16)),
               lambda: dict(input_ids=_ids())),
    "qwen3-moe": (lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**SMALL, num_key_value_heads=1, num_experts=4,
                                                                  num_experts_per_tok=2, moe_intermediate_size=32,
                                                                  head_dim=16)), lambda: dict(input_ids=_ids())),
    "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                                           vocab_size=100)),
           lambda: dict(input_ids=_ids(), decoder_input_ids=_ids(s=8))),
    "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100,
                                                       state_size=8)), lambda: dict(input_ids=_ids())),
    "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, vocab_size=100,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
        lambda: dict(input_features=torch.randn(2, 8, 32).to(torch.bfloat16), decoder_input_ids=_ids(s=4))),
    "clip-text": (lambda: T.CLIPTextModel(T.CLIPTextConfig(**SMALL, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
                  lambda: dict(input_ids=_ids())),
    "vit": (lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=32, patch_size=8)),
            lambda: dict(pixel_values=_pixels())),
    "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                              num_heads=[2, 2], window_size=4)), lambda: dict(pixel_values=_pixels())),
    "resnet": (lambda: T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
               lambda: dict(pixel_values=_pixels())),
}


def _loss(out):
    t = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return t.float().square().mean()


@pytest.mark.parametrize("name", list(MODELS))
def test_cast_model_and_an_8bit_step_on_a_third_party_model(name):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    model = dist8.cast_model(build(), torch.bfloat16)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert norms, "every model here has norm layers"
    for m in norms:  # kept fp32, each one (torch's classes and the library's own)
        assert all(p.dtype == torch.float32 for p in m.parameters(recurse=False)), type(m).__name__
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-3, master_weight_bits=24)
    x = inputs()
    for _ in range(2):
        loss = _loss(model(**x))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} parameters moved"
