"""Gated cross-attention (Llama 3.2 vision) against transformers' MllamaForCausalLM -- the text model of
MllamaForConditionalGeneration -- given the same image features (cross_attention_states), tiny random
config, fp32; and the zero gates leaving the frozen language model's logits exactly as they were.
atol 1e-5: the same sums in another order (~1e-6 here); a missing or misplaced layer differs by ~1."""

import pytest
import torch
from transformers import MllamaForCausalLM, MllamaTextConfig

from llmkit.config import ModelConfig
from llmkit.errors import DataError
from llmkit.model import Transformer
from llmkit.vision import VisionConfig, VisionLanguageModel, VLMConfig

ATOL = 1e-5
IMAGE = 100  # Mllama's text model embeds 8 ids past its vocabulary; the first is our image token
VISION = VisionConfig(image_size=8, patch_size=4, channels=1, d_model=16, n_layer=1, n_head=2, d_ff=32,
                      image_mean=(0.5,), image_std=(0.5,))


def lm_config() -> ModelConfig:
    return ModelConfig(vocab_size=108, n_layer=2, n_head=4, n_kv_head=2, d_model=48, d_ff=96, max_seq_len=64,
                       rope_theta=500000.0, norm_eps=1e-5)


def mllama_pair():
    """A random MllamaForCausalLM with layers (self, cross, self) and our model with the same weights:
    two decoder blocks and a cross-attention layer before block 1 (cross_every=2)."""
    torch.manual_seed(0)
    hf = MllamaForCausalLM(MllamaTextConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=3, cross_attention_layers=[1], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)  # the gates too: a closed gate would hide a wrong cross-attention
    sd = hf.state_dict()
    ours = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "lm_head.weight": torch.cat([sd["lm_head.weight"], torch.zeros(8, 48)])}
    for block, layer in ((0, 0), (1, 2)):
        h = f"model.layers.{layer}"
        ours.update({f"blocks.{block}.attn_norm.weight": sd[f"{h}.input_layernorm.weight"],
                     f"blocks.{block}.mlp_norm.weight": sd[f"{h}.post_attention_layernorm.weight"]})
        ours.update({f"blocks.{block}.attn.{n}_proj.weight": sd[f"{h}.self_attn.{n}_proj.weight"] for n in "qkvo"})
        ours.update({f"blocks.{block}.mlp.{n}_proj.weight": sd[f"{h}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
    lm = Transformer.from_state_dict(lm_config(), ours)
    model = VisionLanguageModel(VLMConfig(vision=VISION, mode="cross", image_token_id=IMAGE, cross_every=2), lm)
    h, cross = "model.layers.1", {}
    cross.update({f"{n}_proj.weight": sd[f"{h}.cross_attn.{n}_proj.weight"] for n in "qkvo"})
    cross.update({f"{n}_norm.weight": sd[f"{h}.cross_attn.{n}_norm.weight"] for n in "qk"})
    cross.update({f"mlp.{n}_proj.weight": sd[f"{h}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")})
    cross.update({"attn_norm.weight": sd[f"{h}.input_layernorm.weight"],
                  "mlp_norm.weight": sd[f"{h}.post_attention_layernorm.weight"],
                  "attn_gate": sd[f"{h}.cross_attn_attn_gate"], "mlp_gate": sd[f"{h}.cross_attn_mlp_gate"]})
    model.cross["1"].load_state_dict(cross, strict=True)
    return hf, model.eval()


def test_cross_attention_matches_mllama_text_model():
    hf, ours = mllama_pair()
    assert list(ours.cross) == ["1"]
    ids = torch.tensor([[1, IMAGE, 5, 6, 7], [1, IMAGE, 9, 8, 3]])
    states = torch.randn(2, 5, 48)  # the projected image features, one image per row
    with torch.no_grad():
        # The prepared additive mask (batch, 1, text, image tokens) that MllamaForConditionalGeneration passes
        # its text model, all zeros: every text token reads every image token. (Without any mask, transformers'
        # SDPA path would make the cross-attention causal over the image tokens, which no real call does.)
        mask = torch.zeros(2, 1, 5, 5)
        want = hf(input_ids=ids, cross_attention_states=states, cross_attention_mask=mask).logits
        got = ours(ids, image_states=states)[..., :100]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the image matters: another image changes the logits by far more than the tolerance
    with torch.no_grad():
        assert (ours(ids, image_states=torch.randn(2, 5, 48))[..., :100] - want).abs().max() > 1e-2


def test_zero_gates_leave_the_frozen_lm_exact():
    """At initialisation (gates 0) the multimodal model's text logits are the LM's, bit for bit, and the
    gates are where the first gradient goes."""
    torch.manual_seed(0)
    lm = Transformer(lm_config().replace(n_layer=4))
    model = VisionLanguageModel(VLMConfig(vision=VISION, mode="cross", image_token_id=IMAGE, cross_every=2), lm)
    assert sorted(model.cross) == ["1", "3"]
    ids = torch.tensor([[1, IMAGE, 5, 6, 7, 9]])
    pixels = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), lm(ids))
    loss = model(ids, pixels).logsumexp(-1).mean()
    loss.backward()
    assert all(layer.attn_gate.grad.abs().item() > 0 for layer in model.cross.values())


def test_prefix_mode_text_only_is_the_lm():
    torch.manual_seed(0)
    lm = Transformer(lm_config())
    model = VisionLanguageModel(VLMConfig(vision=VISION, mode="prefix", image_token_id=IMAGE), lm)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids), lm(ids))


def test_cross_mode_needs_one_placeholder_and_image_per_row():
    _, ours = mllama_pair()
    states = torch.randn(1, 5, 48)
    with pytest.raises(DataError, match=r"image placeholders per row \[2\] with 1 image\(s\) for 1 row\(s\)"):
        ours(torch.tensor([[1, IMAGE, 5, IMAGE]]), image_states=states)
    with pytest.raises(DataError, match=r"image placeholders per row \[1\] with 0 image\(s\)"):
        ours(torch.tensor([[1, IMAGE, 5]]))
