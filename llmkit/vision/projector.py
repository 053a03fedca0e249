"""The projector: image features into the language model's width, linear -> activation -> linear
(LLaVA-1.5's MLP; transformers' LlavaMultiModalProjector, whose parameter names these are)."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmkit.model import _ACTIVATIONS


class Projector(nn.Module):
    def __init__(self, d_in: int, d_out: int, activation: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.linear_2 = nn.Linear(d_out, d_out)
        self.act = _ACTIVATIONS[activation]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))
