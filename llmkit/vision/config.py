"""VisionConfig (a ViT's shape, and the HF `vit` config.json both ways) and VLMConfig (how its
features reach the language model)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmkit.config import ACTIVATIONS, ModelConfig
from llmkit.errors import ConfigError

MODES = ("prefix", "cross")  # LLaVA: image tokens in the prompt; Llama 3.2: gated cross-attention layers


@dataclass
class VisionConfig:
    """A ViT: square images cut into patch_size patches, a CLS token, learned positions, pre-norm blocks."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_ff: int = 3072
    norm_eps: float = 1e-12
    activation: str = "gelu"
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "d_model", "n_layer", "n_head", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"VisionConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                              "a ViT cuts the image into whole patches")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}; expected one of {ACTIVATIONS}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if len(self.image_mean) != self.channels or len(self.image_std) != self.channels:
            raise ConfigError(f"image_mean and image_std need one value per channel ({self.channels})")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def block_config(self) -> ModelConfig:
        """The ModelConfig of the encoder's blocks: llmkit's encoder style (bidirectional, LayerNorm, biases,
        a plain GELU MLP), so ViT runs the same `Block` the language models run."""
        return ModelConfig(vocab_size=1, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                           d_ff=self.d_ff, max_seq_len=self.n_patches + 1, pos_embedding="learned",
                           norm="layernorm", norm_eps=self.norm_eps, activation=self.activation, gated_mlp=False,
                           bias=True, causal=False, name="vit")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_config(self) -> dict[str, Any]:
        """transformers' ViTConfig as config.json."""
        return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
                "intermediate_size": self.d_ff, "hidden_act": _HF_ACT[self.activation],
                "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.channels,
                "layer_norm_eps": self.norm_eps, "qkv_bias": True, "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0}

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> VisionConfig:
        if hf.get("model_type") != "vit":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r}; llmkit's image encoder reads 'vit'")
        if not hf.get("qkv_bias", True):
            raise ConfigError(f"{source}: qkv_bias=false; llmkit's ViT has biases on q, k and v")
        act = hf.get("hidden_act", "gelu")
        if act not in _FROM_HF_ACT:
            raise ConfigError(f"{source}: hidden_act={act!r}; expected one of {sorted(_FROM_HF_ACT)}")
        image_size, patch_size = hf.get("image_size", 224), hf.get("patch_size", 16)
        if not isinstance(image_size, int) or not isinstance(patch_size, int):
            raise ConfigError(f"{source}: image_size and patch_size must be integers (square images)")
        channels = hf.get("num_channels", 3)
        return cls(image_size=image_size, patch_size=patch_size, channels=channels,
                   d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                   d_ff=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
                   activation=_FROM_HF_ACT[act], image_mean=(0.5,) * channels, image_std=(0.5,) * channels)


_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}
_FROM_HF_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "silu": "silu",
                "relu": "relu"}


@dataclass
class VLMConfig:
    """How the image features reach the language model.

    mode "prefix" (LLaVA): every `image_token_id` of the prompt is replaced by one projected patch feature,
    `feature_layer` names the encoder hidden state read (transformers' vision_feature_layer: -1 is the last
    block's output, before the final norm) and the CLS token is dropped (its "default" strategy).
    mode "cross" (Llama 3.2 vision): the projected features (CLS included, after the final norm) are the
    keys and values of a gated cross-attention layer before every `cross_every`-th decoder block, starting
    at block `cross_every - 1`; the prompt's `image_token_id` marks where the image belongs (one per image).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    mode: str = "prefix"
    image_token_id: int = 0
    feature_layer: int = -1
    cross_every: int = 4
    projector_activation: str = "gelu"

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; expected one of {MODES}")
        if not -self.vision.n_layer - 1 <= self.feature_layer <= self.vision.n_layer:
            raise ConfigError(f"feature_layer={self.feature_layer} for a {self.vision.n_layer}-layer encoder; "
                              f"expected {-self.vision.n_layer - 1}..{self.vision.n_layer}")
        if not isinstance(self.cross_every, int) or self.cross_every <= 0:
            raise ConfigError(f"cross_every must be a positive integer, got {self.cross_every!r}")
        if self.projector_activation not in ACTIVATIONS:
            raise ConfigError(f"projector_activation={self.projector_activation!r}; expected one of {ACTIVATIONS}")

    def cross_layers(self, n_layer: int) -> list[int]:
        """The decoder blocks a cross-attention layer runs before."""
        return list(range(self.cross_every - 1, n_layer, self.cross_every)) if self.mode == "cross" else []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
