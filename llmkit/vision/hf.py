"""transformers' LLaVA folders (LlavaForConditionalGeneration with a ViT tower) both ways: config.json's
vision_config / text_config / image_token_id, and the tensors under vision_tower., multi_modal_projector.
and language_model. -- each part named as its own transformers class names it on disk."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, FormatError
from llmkit.files import atomic_write_json
from llmkit.formats.hf import from_hf, save_safetensors, stack_experts, tensor_map, to_hf
from llmkit.model import Transformer
from llmkit.vision.config import VisionConfig, VLMConfig
from llmkit.vision.encoder import VisionEncoder, hf_names, read_tensors
from llmkit.vision.vlm import VisionLanguageModel

VISION, PROJECTOR, TEXT = "vision_tower.", "multi_modal_projector.", "language_model."


def load_llava(folder: str | Path) -> VisionLanguageModel:
    folder = Path(folder)
    source = folder / "config.json"
    if not source.is_file():
        raise FormatError(f"{folder}: no config.json; expected a LlavaForConditionalGeneration folder")
    hf = json.loads(source.read_text())
    if hf.get("model_type") != "llava":
        raise ConfigError(f"{source}: model_type {hf.get('model_type')!r}; expected 'llava'")
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{source}: vision_feature_select_strategy={hf['vision_feature_select_strategy']!r}; "
                          "llmkit reads 'default' (the CLS token dropped)")
    if not hf.get("multimodal_projector_bias", True):
        raise ConfigError(f"{source}: multimodal_projector_bias=false; llmkit's projector has biases")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConfigError(f"{source}: vision_feature_layer={layer!r}; llmkit reads one layer, not a list")
    act = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "relu": "relu"}.get(
        hf.get("projector_hidden_act", "gelu"))
    if act is None:
        raise ConfigError(f"{source}: projector_hidden_act={hf.get('projector_hidden_act')!r} is not supported")
    vision = VisionConfig.from_hf_config(hf["vision_config"], f"{source} (vision_config)")
    text = ModelConfig.from_hf_config(hf["text_config"], f"{source} (text_config)")
    config = VLMConfig(vision=vision, mode="prefix", image_token_id=hf.get("image_token_id", hf.get("image_token_index")),
                       feature_layer=layer, projector_activation=act)
    tensors = read_tensors(folder / "model.safetensors")
    known = set()
    lm_tensors: dict[str, torch.Tensor] = {}
    entries = tensor_map(text)
    for e in entries:
        name = TEXT + e.hf
        if name not in tensors:
            raise FormatError(f"{folder}: tensor {name!r} is missing")
        known.add(name)
        lm_tensors.update(from_hf(e, tensors[name]))
    stack_experts(lm_tensors, entries)
    if text.tie_embeddings:
        lm_tensors["lm_head.weight"] = lm_tensors["embed.weight"]
    encoder = VisionEncoder.from_tensors(vision, {k[len(VISION):]: v for k, v in tensors.items() if k.startswith(VISION)},
                                         str(folder))
    model = VisionLanguageModel(config, Transformer.from_state_dict(text, lm_tensors), encoder)
    projector = {k[len(PROJECTOR):]: v.float() for k, v in tensors.items() if k.startswith(PROJECTOR)}
    model.projector.load_state_dict(projector, strict=True)
    stray = sorted(k for k in tensors if not k.startswith((VISION, PROJECTOR)) and k not in known)
    if stray:
        raise FormatError(f"{folder}: unexpected tensor(s) {stray[:5]} in a LLaVA checkpoint")
    return model.eval()


def save_llava(model: VisionLanguageModel, folder: str | Path) -> Path:
    if model.config.mode != "prefix":
        raise ConfigError("only a prefix-mode (LLaVA) model is written as a LlavaForConditionalGeneration folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm_state = model.lm.state_dict()
    tensors = {TEXT + e.hf: to_hf(e, lm_state) for e in tensor_map(model.lm.config)}
    encoder_state = model.encoder.state_dict()
    tensors.update({VISION + hf: encoder_state[ours] for ours, hf in hf_names(model.config.vision).items()})
    tensors.update({PROJECTOR + k: v for k, v in model.projector.state_dict().items()})
    save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, folder / "model.safetensors")
    c = model.config
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}[c.projector_activation]
    atomic_write_json(folder / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": c.vision.to_hf_config(), "text_config": model.lm.config.to_hf_config(),
        "image_token_id": c.image_token_id, "vision_feature_layer": c.feature_layer,
        "vision_feature_select_strategy": "default", "projector_hidden_act": act, "multimodal_projector_bias": True,
        "image_seq_length": c.vision.n_patches, "tie_word_embeddings": model.lm.config.tie_embeddings})
    return folder
