"""Structured pruning (Minitron's width and depth pruning): whole attention heads, MLP channels and
layers go, ranked by their activations on calibration text, leaving a smaller *dense* model (a new
`ModelConfig` and its weights) that runs faster anywhere: an HF folder, a GGUF, llama.cpp.

Importance, all from one calibration pass (Muralidharan et al. 2024, "Compact Language Models via
Pruning and Knowledge Distillation"):
- a head: the L2 norm of its attention output (its slice of `o_proj`'s input); with grouped-query
  attention a key/value head and the query heads it serves go together, ranked by their sum;
- an MLP channel: the L2 norm of its activation (its column of `down_proj`'s input);
- a layer: 1 - cos(block input, block output) averaged over tokens (ShortGPT's Block Influence): a
  block that barely turns the residual stream is the cheapest to drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.quant.calibrate import calibrate


@dataclass
class Importance:
    """Per layer: each KV group's importance (n_layer, n_kv_head), each MLP channel's (n_layer, d_ff),
    and each layer's Block Influence (n_layer,)."""

    groups: torch.Tensor
    channels: torch.Tensor
    layers: torch.Tensor


@torch.no_grad()
def importance(model: Transformer, batches: Iterable[torch.Tensor]) -> Importance:
    """Rank heads (by GQA group), MLP channels and layers by their activations on `batches` of token ids."""
    c = model.config
    if c.n_experts:
        raise ConfigError("structured pruning of mixture-of-experts blocks is not supported; expected a dense MLP")
    influence = torch.zeros(c.n_layer, dtype=torch.float64)
    counts = torch.zeros(c.n_layer)

    def block_hook(i):
        def record(_module, args, output):
            cos = torch.nn.functional.cosine_similarity(args[0].double(), output.double(), dim=-1)
            influence[i] += (1 - cos).sum()
            counts[i] += cos.numel()
        return record

    handles = [b.register_forward_hook(block_hook(i)) for i, b in enumerate(model.blocks)]
    try:
        stats = calibrate(model, list(batches))
    finally:
        for h in handles:
            h.remove()
    group = c.n_head // c.n_kv_head
    heads = torch.stack([stats.sum_sq[f"blocks.{i}.attn.o_proj"].view(c.n_head, c.head_dim).sum(-1).sqrt()
                         for i in range(c.n_layer)])
    channels = torch.stack([stats.norm(f"blocks.{i}.mlp.down_proj") for i in range(c.n_layer)])
    return Importance(heads.view(c.n_layer, c.n_kv_head, group).sum(-1), channels, influence / counts)


def check_targets(c: ModelConfig, n_head: int, d_ff: int, n_layer: int) -> None:
    """One clear error for a target the model cannot have: zero heads, broken GQA groups, growth."""
    group = c.n_head // c.n_kv_head
    if n_head < 1:
        raise ConfigError(f"n_head={n_head} would leave zero attention heads in every layer; expected 1..{c.n_head}")
    if n_head > c.n_head or n_head % group:
        raise ConfigError(f"n_head={n_head} breaks GQA grouping: each of the {c.n_kv_head} key/value heads serves "
                          f"{group} query heads, so expected a multiple of {group} up to {c.n_head}")
    if not 1 <= d_ff <= c.d_ff:
        raise ConfigError(f"d_ff={d_ff}; expected 1..{c.d_ff} MLP channels")
    if not 1 <= n_layer <= c.n_layer:
        raise ConfigError(f"n_layer={n_layer}; expected 1..{c.n_layer} layers")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values  # the most important k, in their original order


@torch.no_grad()
def prune_structured(model: Transformer, imp: Importance, n_head: int | None = None, d_ff: int | None = None,
                     n_layer: int | None = None) -> Transformer:
    """A new, smaller dense Transformer keeping the `n_head` query heads (whole GQA groups), `d_ff` MLP
    channels and `n_layer` layers that `imp` ranks highest. None keeps a dimension whole."""
    c = model.config
    n_head = c.n_head if n_head is None else n_head
    d_ff = c.d_ff if d_ff is None else d_ff
    n_layer = c.n_layer if n_layer is None else n_layer
    check_targets(c, n_head, d_ff, n_layer)
    group, hd = c.n_head // c.n_kv_head, c.head_dim
    layers = _top(imp.layers, n_layer).tolist()
    new = c.replace(n_head=n_head, n_kv_head=n_head // group, head_dim=hd, d_ff=d_ff, n_layer=n_layer,
                    layer_types=None if c.layer_types is None else [c.layer_types[i] for i in layers])
    old = model.state_dict()
    sd = {k: v for k, v in old.items() if not k.startswith("blocks.")}
    for j, i in enumerate(layers):
        kv = _top(imp.groups[i], n_head // group)
        q_rows = (kv[:, None] * group + torch.arange(group)).reshape(-1)  # the query heads of the kept groups
        q_idx = (q_rows[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_idx = (kv[:, None] * hd + torch.arange(hd)).reshape(-1)
        ch = _top(imp.channels[i], d_ff)
        rows = {"attn.q_proj": q_idx, "attn.k_proj": kv_idx, "attn.v_proj": kv_idx, "mlp.gate_proj": ch,
                "mlp.up_proj": ch}
        cols = {"attn.o_proj": q_idx, "mlp.down_proj": ch}
        prefix = f"blocks.{i}."
        for key, t in old.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            module, kind = rest.rsplit(".", 1)
            if module in rows:
                t = t.index_select(0, rows[module])
            elif module in cols and kind == "weight":
                t = t.index_select(1, cols[module])
            sd[f"blocks.{j}.{rest}"] = t.clone()
    pruned = Transformer(new).to(dtype=model.dtype)
    pruned.load_state_dict(sd, strict=True)
    if c.tie_embeddings:
        pruned.tie_weights()
    return pruned.eval()
