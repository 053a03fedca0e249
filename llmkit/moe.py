"""Mixture-of-experts feed-forward: a softmax top-k router and `n_experts` SwiGLU MLPs (Mixtral,
Qwen2-MoE, OLMoE), optionally beside a shared MLP every token runs (Qwen2-MoE, with its sigmoid gate).

The experts' weights are stacked 3-D tensors (experts, out, in), as llama.cpp and transformers 5 keep
them. Dispatch is capacity-free (no token is dropped) and picks one of three exact computations of
the same sum, by size:
- grouped (eager, the common case): the (token, expert) pairs sorted by expert, one matmul per expert
  over its contiguous rows, the weighted results added back per token: each expert's weights are read
  once and only chosen pairs are computed;
- gathered (a few tokens, as in decoding): each token's chosen experts' weights indexed out and applied
  with batched matmuls, no sort and no host sync;
- dense (inside `torch.compile`): every expert on every token, weighted by a (tokens, experts) matrix
  that is zero off the top-k; shapes never depend on the routing, so the fixed-shape decode step
  compiles into one graph.
The router logits of the last training forward stay on the layer (`router_logits`) for the auxiliary
losses (`llmkit.losses.load_balancing_loss`, `router_z_loss`), which the training objective adds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from llmkit.config import ModelConfig


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, act: Callable[[torch.Tensor], torch.Tensor], shared: nn.Module | None):
        super().__init__()
        c = config
        self.n_experts, self.top_k, self.renormalize, self.act = c.n_experts, c.experts_per_token, c.moe_renormalize, act
        self.router = nn.Linear(c.d_model, c.n_experts, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(c.n_experts, c.d_ff, c.d_model))
        self.up_proj = nn.Parameter(torch.empty(c.n_experts, c.d_ff, c.d_model))
        self.down_proj = nn.Parameter(torch.empty(c.n_experts, c.d_model, c.d_ff))
        self.shared_expert = shared
        self.shared_expert_gate = nn.Linear(c.d_model, 1, bias=False) if shared is not None and c.shared_expert_gate else None
        self.router_logits: torch.Tensor | None = None

    def fuse(self) -> None:
        if self.shared_expert is not None:
            self.shared_expert.fuse()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (tokens, experts), top-k weights (tokens, k) in x's dtype, expert ids (tokens, k)):
        softmax over all experts in fp32, the k largest, renormalised to sum to 1 when `renormalize`."""
        logits = self.router(x)
        probs = logits.float().softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, experts = self.route(x)
        self.router_logits = logits if self.training else None
        if torch.compiler.is_compiling():
            y = self._dense(x, weights, experts)
        elif x.shape[0] * self.top_k <= self.n_experts:
            y = self._gathered(x, weights, experts)
        else:
            y = self._grouped(x, weights, experts)
        return self.add_shared(x, y).reshape(shape)

    def add_shared(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the routed experts' sum) plus the shared expert's output, sigmoid-gated as Qwen2-MoE's, if any."""
        if self.shared_expert is None:
            return y
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return y + shared

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return (self.act(x @ self.gate_proj[e].t()) * (x @ self.up_proj[e].t())) @ self.down_proj[e].t()

    def _grouped(self, x, weights, experts):
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host sync per layer
        token = order // self.top_k
        rows = x[token].split(counts)
        out = torch.cat([self._expert(rows[e], e) for e in range(self.n_experts)])
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, out)

    def _gathered(self, x, weights, experts):
        h = self.act(torch.einsum("nd,nkfd->nkf", x, self.gate_proj[experts])) \
            * torch.einsum("nd,nkfd->nkf", x, self.up_proj[experts])
        out = torch.einsum("nkf,nkdf->nkd", h, self.down_proj[experts])
        return (out * weights[..., None]).sum(1)

    def _dense(self, x, weights, experts):
        h = self.act(torch.einsum("nd,efd->enf", x, self.gate_proj)) * torch.einsum("nd,efd->enf", x, self.up_proj)
        out = torch.einsum("enf,edf->end", h, self.down_proj)
        mix = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device).scatter(1, experts, weights)
        return torch.einsum("end,ne->nd", out, mix)


def inactive_parameters(config: ModelConfig) -> int:
    """Expert weights a token does not run: (n_experts - experts_per_token) SwiGLU MLPs per layer."""
    return config.n_layer * max(0, config.n_experts - config.experts_per_token) * 3 * config.d_model * config.d_ff


def router_logits(model: nn.Module) -> list[torch.Tensor]:
    """The router logits (tokens, experts) of each MoE layer from `model`'s last training forward, in
    layer order; empty for a dense model or after an eval-mode forward."""
    return [m.router_logits for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
