"""The ViT image encoder: patch embedding (a convolution with stride = kernel = patch size, which is
patchify + one linear layer), a CLS token, learned positions, and the language models' own pre-norm
`Block`s with bidirectional attention; HF `vit` folders (ViTModel) read and written."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from llmkit.errors import DataError, FormatError
from llmkit.files import atomic_write_json
from llmkit.formats.hf import read_safetensors_header, save_safetensors
from llmkit.model import FULL, Block, Step
from llmkit.vision.config import VisionConfig


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_patches + 1, c.d_model))
        blocks = c.block_config()
        self.blocks = nn.ModuleList(Block(blocks, i) for i in range(c.n_layer))
        self.norm = nn.LayerNorm(c.d_model, eps=c.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """ViT's initialisation: N(0, 0.02) matrices, positions and CLS; zero biases; unit norm gains."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                nn.init.trunc_normal_(p, std=0.02)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise DataError(f"pixel_values of shape {tuple(pixel_values.shape)}; this encoder expects "
                            f"(images, {', '.join(map(str, expected))}): run the images through "
                            "llmkit.vision.ImageProcessor, which resizes them to its image_size")

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """transformers' `hidden_states`: the embeddings, then each block's output (before the final norm);
        only the first `upto` blocks run when fewer are needed."""
        self.check_pixels(pixel_values)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        step = Step(0, {FULL: (None, False)})  # every patch sees every patch
        states = [x]
        for block in self.blocks[:upto]:
            x = block(x, None, step, None)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 1 + patches, d_model): ViTModel's last_hidden_state (CLS first, final norm applied)."""
        return self.norm(self.hidden_states(pixel_values)[-1])

    def features(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden_states[layer] (transformers' vision_feature_layer: -1 the last block, 0 the embeddings)."""
        n = self.config.n_layer
        index = layer % (n + 1)
        return self.hidden_states(pixel_values, upto=index)[index]

    # ---- HF folders ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors as transformers' ViTModel (without its pooler) reads them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {hf: state[ours].detach().cpu().contiguous().clone() for ours, hf in hf_names(self.config).items()}
        save_safetensors(tensors, folder / "model.safetensors")
        atomic_write_json(folder / "config.json", self.config.to_hf_config())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, prefix: str = "") -> VisionEncoder:
        """A ViTModel folder (or the `prefix`ed encoder inside a bigger checkpoint). ViTModel's pooler
        (tanh(dense(CLS)), for classification heads) is not part of the features and is not read."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FormatError(f"{folder}: no config.json; expected a transformers ViTModel folder")
        config = VisionConfig.from_hf_config(json.loads((folder / "config.json").read_text()),
                                             str(folder / "config.json"))
        return cls.from_tensors(config, read_tensors(folder / "model.safetensors", prefix), str(folder))

    @classmethod
    def from_tensors(cls, config: VisionConfig, hf_tensors: dict[str, torch.Tensor], source: str) -> VisionEncoder:
        names = hf_names(config)
        known = set(names.values())
        unexpected = sorted(k for k in hf_tensors if k not in known and not k.startswith("pooler."))
        if unexpected:
            raise FormatError(f"{source}: unexpected tensor(s) {unexpected[:5]} for a ViT of this config.json")
        model = cls(config)
        state = {}
        for ours, hf in names.items():
            if hf not in hf_tensors:
                raise FormatError(f"{source}: tensor {hf!r} is missing (a {config.n_layer}-layer ViT)")
            t, want = hf_tensors[hf], model.state_dict()[ours].shape
            if t.shape != want:
                raise FormatError(f"{source}: tensor {hf!r} has shape {list(t.shape)}, expected {list(want)}")
            state[ours] = t.float()
        model.load_state_dict(state, strict=True)
        return model.eval()


def read_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file whose names start with `prefix`, the prefix removed."""
    if not path.is_file():
        raise FormatError(f"{path}: missing; expected the weights of a ViT")
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        return {name[len(prefix):]: f.get_tensor(name) for name in header if name.startswith(prefix)}


def hf_names(c: VisionConfig) -> dict[str, str]:
    """Our parameter name -> transformers' ViTModel name in a checkpoint file."""
    names = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for i in range(c.n_layer):
        o, h = f"blocks.{i}", f"encoder.layer.{i}"
        parts = {"attn.q_proj": "attention.attention.query", "attn.k_proj": "attention.attention.key",
                 "attn.v_proj": "attention.attention.value", "attn.o_proj": "attention.output.dense",
                 "mlp.up_proj": "intermediate.dense", "mlp.down_proj": "output.dense",
                 "attn_norm": "layernorm_before", "mlp_norm": "layernorm_after"}
        for ours, hf in parts.items():
            for p in ("weight", "bias"):
                names[f"{o}.{ours}.{p}"] = f"{h}.{hf}.{p}"
    return names
