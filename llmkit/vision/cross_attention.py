"""The gated cross-attention layer of Llama 3.2 vision (transformers' MllamaCrossAttentionDecoderLayer):

    x = x + tanh(attn_gate) * CrossAttn(norm(x), image)    queries from the text, keys/values from the image
    x = x + tanh(mlp_gate)  * MLP(norm(x))

Both gates start at zero, so a frozen language model with these layers added computes exactly what it
computed alone until training opens them. Queries and keys are RMS-normalised per head; no rotary
positions (the image features carry their own)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.model import MLP, _norm


class GatedCrossAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.attn_norm = _norm(c)
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        self.q_norm = _norm(c, c.head_dim)
        self.k_norm = _norm(c, c.head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_norm = _norm(c)
        self.mlp = MLP(c)
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        std = c.init_std
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.mlp.up_proj, self.mlp.down_proj,
                       *([self.mlp.gate_proj] if self.mlp.gate_proj is not None else [])):
            nn.init.normal_(linear.weight, std=std)

    def image_keys_values(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, image tokens, head_dim) of the image features: computed once
        per image, reused by every decoding step."""
        B, N, _ = image.shape
        k = self.k_norm(self.k_proj(image).view(B, N, self.n_kv_head, self.head_dim).transpose(1, 2))
        v = self.v_proj(image).view(B, N, self.n_kv_head, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, image_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(self.attn_norm(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2))
        k, v = image_kv
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_head != self.n_head)
        x = x + self.attn_gate.tanh() * self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp_gate.tanh() * self.mlp(self.mlp_norm(x))
