"""The ViT image encoder and the image processor against transformers (ViTModel, ViTImageProcessor) on
tiny random configs, fp32. atol 1e-5: the same operations in another order (SDPA vs eager attention, a
conv vs unfold + matmul) differ by float32 rounding, ~1e-6 here; a wrong layout differs by ~1."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor, ViTModel

from llmkit.errors import DataError
from llmkit.vision import ImageProcessor, VisionConfig, VisionEncoder

ATOL = 1e-5
TINY = VisionConfig(image_size=16, patch_size=4, channels=3, d_model=32, n_layer=2, n_head=4, d_ff=64)


def hf_vit(**overrides) -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=3, **overrides)
    model = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # ViT initialises positions/CLS and norms to constants: randomise everything
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def test_vit_parity_both_ways(tmp_path):
    """A ViTModel folder read by llmkit, and llmkit's folder read by ViTModel, give the same features."""
    hf = hf_vit()
    hf.save_pretrained(tmp_path / "hf")
    ours = VisionEncoder.from_pretrained(tmp_path / "hf")
    assert ours.config == TINY
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(ours(pixels), want.last_hidden_state, atol=ATOL, rtol=0)
        for layer in (-1, -2, 0):
            torch.testing.assert_close(ours.features(pixels, layer), want.hidden_states[layer], atol=ATOL, rtol=0)

        ours.save_pretrained(tmp_path / "ours")
        back = ViTModel.from_pretrained(tmp_path / "ours", add_pooling_layer=False).eval()
        torch.testing.assert_close(back(pixel_values=pixels).last_hidden_state, ours(pixels), atol=ATOL, rtol=0)


def test_vit_gelu_tanh_and_grey_channels(tmp_path):
    """Another activation and one input channel travel through the config both ways."""
    torch.manual_seed(1)
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                       image_size=8, patch_size=2, num_channels=1, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    hf = ViTModel(config, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    ours = VisionEncoder.from_pretrained(tmp_path)
    assert (ours.config.activation, ours.config.channels, ours.config.norm_eps) == ("gelu_tanh", 1, 1e-6)
    pixels = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), hf(pixel_values=pixels).last_hidden_state, atol=ATOL, rtol=0)


def test_processor_matches_vit_image_processor():
    """Resize (Pillow, bilinear), rescale and normalise as ViTImageProcessor does; RGB and grey inputs."""
    rng = np.random.default_rng(0)
    ours = ImageProcessor(TINY)
    theirs = ViTImageProcessor(size={"height": 16, "width": 16})
    rgb = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8), "RGB")
    grey = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
    for image in (rgb, grey):
        want = torch.from_numpy(theirs(image.convert("RGB"), return_tensors="np")["pixel_values"])
        got = ours([image])
        assert got.shape == (1, 3, 16, 16)
        # 1e-5: both resize the same uint8 image with Pillow; the rest is float32 arithmetic
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_processor_reads_files_and_rejects_bad_images(tmp_path):
    ours = ImageProcessor(TINY)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    pixels = ours([tmp_path / "red.png"])
    assert torch.allclose(pixels[0, 0], torch.ones(16, 16)) and torch.allclose(pixels[0, 1], -torch.ones(16, 16))
    with pytest.raises(DataError, match=r"mode 'RGBA'.*expected one of \('L', 'RGB'\)"):
        ours([Image.new("RGBA", (20, 20))])
    with pytest.raises(DataError, match=r"3x2 pixels is smaller than one 4x4 patch"):
        ours([Image.new("RGB", (3, 2))])
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(DataError, match="not an image Pillow can read"):
        ours([tmp_path / "not.png"])
    with pytest.raises(DataError, match=r"pixel_values of shape \(1, 3, 8, 8\); this encoder expects \(images, 3, 16, 16\)"):
        VisionEncoder(TINY)(torch.zeros(1, 3, 8, 8))


def test_configs_and_folders_refuse_what_they_cannot_run(tmp_path):
    from llmkit.config import ModelConfig
    from llmkit.errors import ConfigError, FormatError
    from llmkit.model import Transformer
    from llmkit.vision import VisionLanguageModel, VLMConfig
    from llmkit.vision.hf import load_llava
    from llmkit.vision.vlm import load_vlm

    with pytest.raises(ConfigError, match="image_size=10 is not a multiple of patch_size=4"):
        VisionConfig(image_size=10, patch_size=4)
    with pytest.raises(ConfigError, match="mode='both'"):
        VLMConfig(vision=TINY, mode="both")
    with pytest.raises(ConfigError, match="feature_layer=5 for a 2-layer encoder"):
        VLMConfig(vision=TINY, feature_layer=5)
    lm = Transformer(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8, d_ff=16, max_seq_len=16))
    with pytest.raises(ConfigError, match="image_token_id=10 is outside the language model's vocabulary of 10"):
        VisionLanguageModel(VLMConfig(vision=TINY, image_token_id=10), lm)
    with pytest.raises(FormatError, match="not a llmkit vision-language model"):
        (tmp_path / "config.json").write_text('{"model_type": "llama"}')
        load_vlm(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'llama'; expected 'llava'"):
        load_llava(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'llama'; llmkit's image encoder reads 'vit'"):
        VisionEncoder.from_pretrained(tmp_path)
