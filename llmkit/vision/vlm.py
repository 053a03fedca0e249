"""VisionLanguageModel: the ViT encoder, the projector and the one `Transformer`, joined either way.

prefix (LLaVA): the prompt holds `n_patches` image tokens per image (`expand_placeholders`); their
embeddings are replaced, in order, by the projected patch features, and the language model runs as
ever (`inputs_embeds`). cross (Llama 3.2 vision): the prompt holds one image token per image; the
projected features become the keys/values of zero-gated cross-attention layers that run before every
`cross_every`-th block (`before_block`), so every text token of a row reads its row's image.
The language model's own forward is untouched either way: with the gates at zero (or with no image
token in a text-only prompt) its logits are the frozen model's, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, DataError, FormatError
from llmkit.files import atomic_write_json
from llmkit.formats.hf import save_safetensors
from llmkit.model import KVCache, Transformer
from llmkit.vision.config import VLMConfig
from llmkit.vision.cross_attention import GatedCrossAttention
from llmkit.vision.encoder import VisionEncoder, read_tensors
from llmkit.vision.projector import Projector


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig, lm: Transformer, encoder: VisionEncoder | None = None):
        super().__init__()
        if not lm.config.causal or lm.lm_head is None:
            raise ConfigError("a vision-language model needs a decoder language model (causal, with an LM head)")
        if not 0 <= config.image_token_id < lm.config.vocab_size:
            raise ConfigError(f"image_token_id={config.image_token_id} is outside the language model's vocabulary "
                              f"of {lm.config.vocab_size}")
        self.config = config
        self.encoder = encoder or VisionEncoder(config.vision)
        if self.encoder.config != config.vision:
            raise ConfigError("the encoder's VisionConfig differs from VLMConfig.vision")
        self.projector = Projector(config.vision.d_model, lm.config.d_model, config.projector_activation)
        self.lm = lm
        self.cross = nn.ModuleDict({str(i): GatedCrossAttention(lm.config)
                                    for i in config.cross_layers(lm.config.n_layer)})

    @property
    def tokens_per_image(self) -> int:
        """Image tokens one placeholder stands for in the prompt."""
        return self.config.vision.n_patches if self.config.mode == "prefix" else 1

    def expand_placeholders(self, ids: list[int]) -> list[int]:
        """A tokenized prompt with each image token repeated `tokens_per_image` times (what LLaVA's
        processor does to the `<image>` of its chat template)."""
        out = []
        for t in ids:
            out.extend([t] * self.tokens_per_image if t == self.config.image_token_id else [t])
        return out

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, tokens, lm d_model): prefix mode's patch features of `feature_layer` without CLS;
        cross mode's whole last_hidden_state (CLS and final norm included), projected."""
        if self.config.mode == "prefix":
            features = self.encoder.features(pixel_values, self.config.feature_layer)[:, 1:]
        else:
            features = self.encoder(pixel_values)
        return self.projector(features)

    def _check_placeholders(self, input_ids: torch.Tensor, n_images: int) -> None:
        is_image = input_ids == self.config.image_token_id
        per = self.tokens_per_image
        if self.config.mode == "prefix":
            n_tokens = int(is_image.sum())
            if n_tokens % per:
                raise DataError(f"the prompt holds {n_tokens} image tokens, not a multiple of the {per} one image "
                                "takes; build prompts with VisionLanguageModel.expand_placeholders")
            if n_tokens // per != n_images:
                raise DataError(f"the prompt has {n_tokens // per} image placeholder(s) ({n_tokens} image tokens, "
                                f"{per} per image) but {n_images} image(s) were given; expected one image per "
                                "placeholder")
            return
        counts = is_image.sum(1).tolist()
        if n_images != input_ids.shape[0] or any(c != 1 for c in counts):
            raise DataError(f"image placeholders per row {counts} with {n_images} image(s) for {input_ids.shape[0]} "
                            "row(s); cross-attention mode expects exactly one placeholder and one image per row")

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, image_states: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab), or the loss given `labels` (IGNORE_INDEX on the prompt and images).

        image_states: `image_features(pixel_values)` computed once (a cross-attention model decoding
        token by token passes them with every step; the prompt's placeholders are checked on the first)."""
        if pixel_values is not None and image_states is not None:
            raise ConfigError("pass pixel_values or image_states, not both")
        if pixel_values is not None:
            image_states = self.image_features(pixel_values)
        n_images = 0 if image_states is None else image_states.shape[0]
        if self.config.mode == "prefix":
            first = kv_cache is None or kv_cache.length == 0
            if first or (input_ids == self.config.image_token_id).any():
                self._check_placeholders(input_ids, n_images if (first or pixel_values is not None) else 0)
            if image_states is None:
                return self.lm(input_ids, attention_mask, kv_cache=kv_cache, labels=labels)
            embeds = self.lm.embed_tokens(input_ids)
            mask = (input_ids == self.config.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_states.to(embeds.dtype))
            return self.lm(input_ids, attention_mask, kv_cache=kv_cache, labels=labels, inputs_embeds=embeds)
        if kv_cache is None or kv_cache.length == 0:
            if image_states is None and (input_ids == self.config.image_token_id).any():
                self._check_placeholders(input_ids, 0)
            if image_states is not None:
                self._check_placeholders(input_ids, n_images)
        if image_states is None:  # text only: the cross-attention layers have nothing to read
            return self.lm(input_ids, attention_mask, kv_cache=kv_cache, labels=labels)
        kv = {name: layer.image_keys_values(image_states) for name, layer in self.cross.items()}

        def before_block(i: int, x: torch.Tensor) -> torch.Tensor:
            name = str(i)
            return self.cross[name](x, kv[name]) if name in self.cross else x

        return self.lm(input_ids, attention_mask, kv_cache=kv_cache, labels=labels, before_block=before_block)

    @torch.no_grad()
    def generate(self, input_ids: list[int], pixel_values: torch.Tensor | None, max_new_tokens: int = 32,
                 stop: set[int] | None = None) -> list[int]:
        """Greedy continuation of one prompt (placeholders already expanded) about its image(s)."""
        self.eval()
        device = self.lm.device
        ids = torch.tensor([input_ids], device=device)
        cache = KVCache(self.lm.config, 1, len(input_ids) + max_new_tokens, device=device, dtype=self.lm.dtype)
        states = None if pixel_values is None else self.image_features(pixel_values.to(device))
        logits = self(ids, kv_cache=cache, image_states=states)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            if stop and token in stop:
                break
            out.append(token)
            cross_states = states if self.config.mode == "cross" else None
            logits = self(torch.tensor([[token]], device=device), kv_cache=cache, image_states=cross_states)
        return out

    # ---- llmkit's own folder: config.json (both configs) + model.safetensors (every tensor) ----------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the whole model (LoRA merged first: `peft.merge_lora`) where `load_vlm` reads it."""
        if any(".lora_" in name for name in self.state_dict()):
            raise ConfigError("merge the LoRA adapters (llmkit.peft.lora.merge_lora(model.lm)) before saving")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()
                 if not (k == "lm.lm_head.weight" and self.lm.config.tie_embeddings)}
        save_safetensors(state, folder / WEIGHTS)
        atomic_write_json(folder / CONFIG, {"llmkit_vlm": self.config.to_dict(), "lm": self.lm.config.to_dict()})
        return folder


CONFIG, WEIGHTS = "config.json", "model.safetensors"


def load_vlm(folder: str | Path) -> VisionLanguageModel:
    """A folder `VisionLanguageModel.save_pretrained` wrote."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{folder / CONFIG}: cannot read ({e}); expected a vision-language model folder") from None
    if "llmkit_vlm" not in meta:
        raise FormatError(f"{folder / CONFIG}: not a llmkit vision-language model (no 'llmkit_vlm' entry)")
    model = VisionLanguageModel(VLMConfig(**meta["llmkit_vlm"]), Transformer(ModelConfig.from_dict(meta["lm"])))
    tensors = read_tensors(folder / WEIGHTS)
    if model.lm.config.tie_embeddings:
        tensors["lm.lm_head.weight"] = tensors["lm.embed.weight"]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise FormatError(f"{folder / WEIGHTS}: does not match its config.json ({str(e).splitlines()[0]})") from None
    model.lm.tie_weights()
    return model.eval()
