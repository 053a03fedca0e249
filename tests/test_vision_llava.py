"""The LLaVA path (image tokens in the prompt) against transformers' LlavaForConditionalGeneration with a
ViT tower and a Llama text model, tiny random config, fp32, both ways through HF folders. atol 1e-5:
float32 rounding of the same sums in another order (~1e-6 here); a misplaced image token differs by ~1."""

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, ViTConfig

from llmkit.errors import DataError
from llmkit.vision.hf import load_llava, save_llava

ATOL = 1e-5
IMAGE = 99  # the image token id: the last of the 100-token vocabulary


def hf_llava(feature_layer: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=8, num_channels=3)
    text = LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def prompt(model, images: int) -> torch.Tensor:
    ids = [5, 6]
    for i in range(images):
        ids += [IMAGE] + [10 + i, 11]
    return torch.tensor([model.expand_placeholders(ids)])


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_llava_parity_both_ways(tmp_path, feature_layer):
    hf = hf_llava(feature_layer)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_llava(tmp_path / "hf")
    assert ours.tokens_per_image == 4 and ours.config.feature_layer == feature_layer
    ids = prompt(ours, images=2)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(ours(ids, pixels), want, atol=ATOL, rtol=0)
        save_llava(ours, tmp_path / "ours")
        back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels).logits, want, atol=ATOL, rtol=0)


def test_llava_generate_uses_the_cache_as_a_full_forward(tmp_path):
    """Greedy decoding with the KV cache continues exactly as re-running the whole prompt would."""
    hf_llava(-1).save_pretrained(tmp_path)
    ours = load_llava(tmp_path)
    ids, pixels = prompt(ours, images=1), torch.randn(1, 3, 16, 16)
    out = ours.generate(ids[0].tolist(), pixels, max_new_tokens=4)
    full = ids
    with torch.no_grad():
        for _ in range(4):
            full = torch.cat([full, ours(full, pixels)[:, -1:].argmax(-1)], 1)
    assert out == full[0, ids.shape[1]:].tolist()


def test_placeholders_and_images_must_match(tmp_path):
    hf_llava(-1).save_pretrained(tmp_path)
    ours = load_llava(tmp_path)
    ids = prompt(ours, images=2)
    with pytest.raises(DataError, match=r"the prompt has 2 image placeholder\(s\) \(8 image tokens, 4 per image\) "
                                        r"but 1 image\(s\) were given"):
        ours(ids, torch.randn(1, 3, 16, 16))
    with pytest.raises(DataError, match="not a multiple of the 4 one image takes"):
        ours(torch.tensor([[5, IMAGE, 6]]), torch.randn(1, 3, 16, 16))
