"""The Transformer: one decoder-only class whose variants (GPT-2, Llama, Qwen2, Gemma-3) are config fields.

Reads top to bottom: rotary embeddings, the KV cache, attention masks, attention, MLP, block, model.
Every caller -- training, evaluation, generation, the server, beam search, PPO -- runs the same
trunk (`Transformer._trunk`: embed -> RoPE -> blocks -> final norm), entered either through
`forward`/`hidden_states` (checked inputs, any length, exact-size cache reads) or through
`decode_step` (one token per row with shapes that never change, for `torch.compile`). Attention
goes through `F.scaled_dot_product_attention`; grouped-query attention shares each key/value head
across a group of query heads; sliding-window layers see only the last `sliding_window` positions
and keep only that many in the cache (a ring buffer), so their memory stops growing with the context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit import rope
from llmkit.config import ModelConfig
from llmkit.data.collate import IGNORE_INDEX
from llmkit.errors import ConfigError
from llmkit.losses import linear_cross_entropy
from llmkit.moe import MoE, inactive_parameters
from llmkit.tokenizer import Tokenizer

FULL, SLIDING = "full_attention", "sliding_attention"
BeforeBlock = Callable[[int, torch.Tensor], torch.Tensor]  # (block index, hidden states) -> hidden states

# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (the "rotate half" layout used by transformers' Llama)


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype, kind: str = FULL):
    """cos and sin of shape (batch, seq, head_dim) for integer `positions` of shape (batch, seq).

    Sliding layers of a model with `rope_local_theta` (Gemma-3) use that base without scaling;
    every other layer uses `rope_theta` with `rope_scaling` (llmkit/rope.py)."""
    theta, scaling = config.rope_theta, config.rope_scaling
    if kind == SLIDING and config.rope_local_theta is not None:
        theta, scaling = config.rope_local_theta, None
    seq_len = int(positions.max()) + 1 if rope.is_dynamic(scaling) else None
    inv_freq, factor = rope.inv_freq(config.head_dim, theta, scaling, config.max_seq_len, seq_len, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # fp32 even under autocast: positions are large
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of `x` (batch, heads, seq, head_dim) by the position angle."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------
# KV cache


def ring_slots(filled: int | torch.Tensor, window: int) -> torch.Tensor:
    """Which cache slot each of a ring buffer's `window` entries holds once slots 0..filled-1 were
    written (slot s lives at entry s % window); -1 for an entry never written."""
    device = filled.device if isinstance(filled, torch.Tensor) else None
    entry = torch.arange(window, device=device)
    slots = (filled - 1) - ((filled - 1 - entry) % window)
    return torch.where(slots >= 0, slots, -1)


class KVCache:
    """Preallocated keys and values for every layer of one batch.

    Slots are shared by every row: slot s of each row is written by the same forward call.
    `valid[b, s]` says whether slot s of row b holds a real token (left padding does not), and
    `next_position[b]` is the position id the next token of row b gets, so a left-padded batch
    decodes exactly as each prompt would alone. A full-attention layer keeps every slot; a
    sliding-window layer whose window is shorter than the cache keeps only the last `window` slots,
    slot s at entry s % window (a ring buffer).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if not config.causal:
            raise ConfigError("this model is an encoder (causal=False): every token reads the whole sequence, so "
                              "it cannot generate; use llmkit.embed, model.classify or its MLM logits")
        self.max_len = max_len or config.max_seq_len
        self.sliding = [config.sliding_window if config.layer_type(i) == SLIDING else None
                        for i in range(config.n_layer)]
        self.windows = self._ring_sizes(self.sliding, self.max_len)
        shapes = [(batch_size, config.n_kv_head, window or self.max_len, config.head_dim) for window in self.windows]
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.valid = torch.zeros(batch_size, self.max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far (the same for every row)

    @staticmethod
    def _ring_sizes(sliding: list[int | None], max_len: int) -> list[int | None]:
        """A sliding layer's buffer is a ring of `window` entries when the window is shorter than the cache."""
        return [w if w is not None and w < max_len else None for w in sliding]

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values (what grows with the context)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor):
        """Write the new keys/values (batch, heads, new, head_dim) at slots start.. and return what the
        new queries attend to, in the order of `key_slots`.

        A tensor `start` (the fixed-shape path of `Transformer.decode_step`, one token) writes in place
        and returns the whole buffers, so shapes never change from step to step.
        """
        keys, values, window = self.keys[layer], self.values[layer], self.windows[layer]
        if isinstance(start, torch.Tensor):
            entry = start if window is None else start % window
            keys.index_copy_(2, entry, k)
            values.index_copy_(2, entry, v)
            return keys, values
        new, end = k.shape[2], start + k.shape[2]
        if window is None:
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            return keys[:, :, :end], values[:, :, :end]
        if new == 1:
            keys[:, :, start % window] = k[:, :, 0]
            values[:, :, start % window] = v[:, :, 0]
            return keys[:, :, :min(end, window)], values[:, :, :min(end, window)]
        old = min(start, window)  # several new tokens: attend to the ring as it was, then keep the last ones
        k_all, v_all = torch.cat([keys[:, :, :old], k], 2), torch.cat([values[:, :, :old], v], 2)
        kept = min(new, window)
        entries = torch.arange(end - kept, end, device=k.device) % window
        keys.index_copy_(2, entries, k[:, :, -kept:])
        values.index_copy_(2, entries, v[:, :, -kept:])
        return k_all, v_all

    def key_slots(self, layer: int, start: int | torch.Tensor, new: int) -> torch.Tensor:
        """The slot of each key that `update(layer, ...)` returns for `new` tokens written at `start`."""
        window = self.windows[layer]
        if isinstance(start, torch.Tensor):
            return torch.arange(self.max_len, device=start.device) if window is None else ring_slots(start + 1, window)
        device = self.valid.device
        if window is None:
            return torch.arange(start + new, device=device)
        if new == 1:
            return ring_slots(start + 1, window).to(device)[:min(start + 1, window)]
        return torch.cat([ring_slots(start, window).to(device)[:min(start, window)],
                          torch.arange(start, start + new, device=device)])

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row `rows[i]` as the new row i (beam search picks its beams; `n` samples copy a prompt)."""
        rows = rows.to(self.valid.device)
        # indexing, not index_select: on CPU index_select(0, ...) of a (batch, heads, slots, dim) buffer ran
        # 20-40x slower (185 ms against 9.6 ms for 6 rows x 1,000 slots to 24, torch 2.13)
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]
        self.next_position = self.next_position[rows]

    @classmethod
    def stack(cls, caches: list[KVCache], room: int = 0) -> KVCache:
        """One cache with every row of `caches` (in order) and `room` free slots after the longest.

        Rows are right-aligned, so the next token of every row goes into the same slot, and leading
        slots that no row uses are dropped: a continuously batched decode joins new rows this way and
        compacts the cache when rows leave. Ring buffers move each kept slot to its new entry.
        """
        used = [int(c.valid[:, :c.length].any(0).int().argmax()) if c.batch_size else c.length for c in caches]
        length = max(c.length - u for c, u in zip(caches, used, strict=True))
        first = caches[0]
        out = object.__new__(cls)
        out.max_len, out.length = length + room, length
        out.sliding = first.sliding
        out.windows = cls._ring_sizes(out.sliding, out.max_len)
        batch = sum(c.batch_size for c in caches)
        out.keys = [k.new_zeros(batch, k.shape[1], w or out.max_len, k.shape[3]) for k, w in zip(first.keys, out.windows, strict=True)]
        out.values = [k.new_zeros(k.shape) for k in out.keys]
        out.valid = first.valid.new_zeros(batch, out.max_len)
        out.next_position = torch.cat([c.next_position for c in caches])
        row = 0
        for c, u in zip(caches, used, strict=True):
            rows, shift = slice(row, row + c.batch_size), length - c.length  # new slot = old slot + shift
            for layer in range(len(out.keys)):
                kept = out.sliding[layer] or c.length  # a sliding layer needs only its last `window` slots
                old = torch.arange(max(u, c.length - kept), c.length, device=out.valid.device)
                src = old if c.windows[layer] is None else old % c.windows[layer]
                dst = old + shift if out.windows[layer] is None else (old + shift) % out.windows[layer]
                for new, before in ((out.keys[layer], c.keys[layer]), (out.values[layer], c.values[layer])):
                    new[rows, :, dst] = before[:, :, src]
            out.valid[rows, length - (c.length - u):length] = c.valid[:, u:c.length]
            row += c.batch_size
        return out

    def reset(self) -> None:
        self.valid.zero_()
        self.next_position.zero_()
        self.length = 0


# ---------------------------------------------------------------------------------------------
# Attention masks: which keys each new query sees, computed once per forward for each layer kind


@dataclass
class Step:
    """Where one forward call writes its keys/values (`start`: first cache slot; a 0-d tensor on the
    fixed-shape decode path) and, per layer kind, SDPA's (mask, is_causal)."""

    start: int | torch.Tensor
    masks: dict[str, tuple[torch.Tensor | None, bool]]
    attentions: list[torch.Tensor] | None = None  # given a list, each layer appends its softmax weights
    first_values: torch.Tensor | None = None  # layer 0's values, which the others mix in (`value_residual`)


def _mask(q_slots: torch.Tensor, k_slots: torch.Tensor, key_valid: torch.Tensor | None, window: int | None):
    """Bool mask (batch, 1, queries, keys) or (queries, keys): key slot <= query slot, inside the window,
    and a real token. A padding query would see no key at all (SDPA would return NaN): it sees itself."""
    q, k = q_slots[:, None], k_slots[None, :]
    mask = (k <= q) & (k >= 0)
    if window is not None:
        mask &= k > q - window
    if key_valid is None:
        return mask
    return ((mask & key_valid[:, None, :]) | (k == q))[:, None]


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose gain is `offset + weight` (Gemma stores weight - 1 and uses offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__(dim, eps=eps)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset:
            return super().forward(x)
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float() + self.offset, self.eps).to(x.dtype)


def _norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.d_model, config.norm_eps, config.norm_offset)
    return nn.LayerNorm(dim or config.d_model, eps=config.norm_eps, bias=True)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # ReLU^2 (Primer; modded-nanogpt's MLP)
}


@torch.no_grad()
def fused_linear(*linears: nn.Linear) -> nn.Linear:
    """One linear layer whose outputs are those of `linears`, concatenated (the weights stacked)."""
    first = linears[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                    device=first.weight.device, dtype=first.weight.dtype)
    out.weight.copy_(torch.cat([m.weight for m in linears]))
    if first.bias is not None:
        out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.kind = layer, c.layer_type(layer)
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        qkv_bias = c.bias or c.qkv_bias
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=c.bias)
        self.q_norm = _norm(c, c.head_dim) if c.qk_norm else None
        self.k_norm = _norm(c, c.head_dim) if c.qk_norm else None
        self.scale = c.attn_scale
        self.dropout = c.dropout
        # value_residual (ResFormer, modded-nanogpt): layer 0 hands its values on; each later layer uses
        # v = l*v + (1-l)*v_0 with a learned l per layer
        self.keeps_values = c.value_residual and layer == 0
        self.value_mix = nn.Parameter(torch.tensor(0.5)) if c.value_residual and layer > 0 else None

    def fuse(self) -> None:
        """Compute q, k and v with one matmul (`qkv_proj`): an inference-time layout of the same weights."""
        if isinstance(self.q_proj, nn.Linear) and not hasattr(self, "qkv_proj"):
            self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    @property
    def qkv_sizes(self) -> list[int]:
        """The output widths of q, k and v: how `qkv_proj`'s rows split."""
        return [self.n_head * self.head_dim, *[self.n_kv_head * self.head_dim] * 2]

    def project_qkv(self, x):
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(x).split(self.qkv_sizes, -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope_cs, step: Step, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.keeps_values:
            step.first_values = v
        elif self.value_mix is not None:
            v = self.value_mix * v + (1 - self.value_mix) * step.first_values
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v, step.start)
        mask, is_causal = step.masks[self.kind]
        dropout = self.dropout if self.training else 0.0
        if step.attentions is not None:  # eager attention, to show its weights (SDPA never forms them)
            y, weights = _eager_attention(q, k, v, mask, is_causal, self.scale)
            step.attentions.append(weights)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if T == 1 and self.n_kv_head != self.n_head:
            # One query per row (decoding): fold each group of query heads into the query axis of
            # its key/value head. Same result as enable_gqa, without SDPA's slow CPU path for it.
            q = q.view(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
            return self.o_proj(y.reshape(B, 1, self.n_head * self.head_dim))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                           scale=self.scale, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _eager_attention(q, k, v, mask, is_causal: bool, scale: float | None):
    """SDPA's result computed step by step, with its (batch, heads, queries, keys) softmax weights."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)).float() * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1)
    return (weights.to(v.dtype) @ v), weights


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) when gated (SwiGLU, GeGLU), else down(act(up(x))) (GPT-2)."""

    def __init__(self, config: ModelConfig, d_ff: int | None = None):
        super().__init__()
        c, d_ff = config, d_ff or config.d_ff
        self.gate_proj = nn.Linear(c.d_model, d_ff, bias=c.bias) if c.gated_mlp else None
        self.up_proj = nn.Linear(c.d_model, d_ff, bias=c.bias)
        self.down_proj = nn.Linear(d_ff, c.d_model, bias=c.bias)
        self.act = _ACTIVATIONS[c.activation]

    def fuse(self) -> None:
        """Compute gate and up with one matmul (`gate_up_proj`): an inference-time layout of the same weights."""
        if isinstance(self.gate_proj, nn.Linear) and not hasattr(self, "gate_up_proj"):
            self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(self.act(gate) * up)
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with `sandwich_norm` each
    sublayer's output is normalised again before it is added (Gemma); with `post_norm` the norm
    follows each residual add instead, norm(x + attn(x)) (BERT)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = _norm(config)
        self.attn = Attention(config, layer)
        self.attn_post_norm = _norm(config) if config.sandwich_norm else None
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config) if not config.n_experts else MoE(
            config, _ACTIVATIONS[config.activation],
            MLP(config, config.shared_expert_d_ff) if config.shared_expert_d_ff else None)
        self.mlp_post_norm = _norm(config) if config.sandwich_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.post_norm = config.post_norm

    def forward(self, x, rope_cs, step: Step, kv_cache: KVCache | None):
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, rope_cs, step, kv_cache)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        h = self.attn(self.attn_norm(x), rope_cs, step, kv_cache)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        x = x + self.drop(h)
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        return x + self.drop(h)


# ---------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model) if c.pos_embedding == "learned" else None
        self.type_embed = nn.Embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None
        self.embed_norm = _norm(c) if c.embed_norm else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        first: dict[str, int] = {}
        for i in range(c.n_layer):
            first.setdefault(c.layer_type(i), i)
        self.kind_layers = {i: kind for kind, i in first.items()}  # the first layer of each kind -> its kind
        self.norm = nn.Identity() if c.post_norm else _norm(c)  # a post-norm block ends normalised
        # A classifier keeps an LM head only when it costs nothing (tied to the embedding), as in HF.
        lm = not c.num_labels or c.tie_embeddings
        mlm = c.mlm_head and not c.num_labels  # BertForMaskedLM's transform before the (biased) decoder
        self.mlm_dense = nn.Linear(c.d_model, c.d_model) if mlm else None
        self.mlm_norm = _norm(c) if mlm else None
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=mlm) if lm else None
        self.pooler = nn.Linear(c.d_model, c.d_model) if c.pooler else None
        self.score = nn.Linear(c.d_model, c.num_labels, bias=c.pooler) if c.num_labels else None
        self.skip_weights = nn.Parameter(torch.ones(c.n_layer // 2)) if c.unet_skips else None
        self.reset_parameters()
        self.tie_weights()

    # ---- construction -------------------------------------------------------------------------
    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    p.zero_()
                elif name.endswith("value_mix"):
                    p.fill_(0.5)  # half its own values, half layer 0's
                elif name == "skip_weights":
                    p.fill_(1.0)  # each skip added whole, as modded-nanogpt starts
                else:
                    p.fill_(1.0 - self.config.norm_offset if self.config.norm == "rmsnorm" else 1.0)  # gains of 1
            else:
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight",
                                                                                  "mlp.down_proj")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int) -> Transformer:
        """Grow the embedding (and an untied LM head) to `vocab_size` rows for tokens added to the tokenizer
        (transformers' `resize_token_embeddings`): the old rows stay, each new one starts at the mean of the
        old ones (as transformers initialises them), so a new token's logit starts where an average one's
        would. Shrinking is refused: it would drop trained rows. Returns self."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ConfigError(f"resize_vocab({vocab_size}): the model has {old} rows; shrinking would drop trained "
                              "rows, expected a size >= the current one")
        if vocab_size == old:
            return self
        if self.lm_head is not None and self.lm_head.bias is not None:
            raise ConfigError("resize_vocab: an LM head with a bias (BERT's MLM decoder) is not resizable here")

        def grown(weight: torch.Tensor) -> nn.Parameter:
            new = weight.new_empty(vocab_size, weight.shape[1])
            new[:old] = weight
            new[old:] = weight.mean(0)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.embed.weight = grown(self.embed.weight)
        self.embed.num_embeddings = vocab_size
        if self.lm_head is not None:
            if not self.config.tie_embeddings:
                self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = vocab_size
        self.config = self.config.replace(vocab_size=vocab_size)
        self.tie_weights()
        return self

    def fuse_projections(self) -> Transformer:
        """q/k/v and gate/up each as one matmul (one kernel call instead of three or two per block,
        which matters when decoding one token); the same weights, for inference. Returns self."""
        for block in self.blocks:
            block.attn.fuse()
            block.mlp.fuse()
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                scored_logits: bool = False, inputs_embeds: torch.Tensor | None = None,
                before_block: BeforeBlock | None = None) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) for `input_ids` of shape (batch, seq), or, given `labels`,
        the mean next-token cross-entropy.

        attention_mask: 1 for real tokens, 0 for (left) padding; either over the new tokens only or,
            as in transformers, over cached + new tokens.
        positions: explicit position ids; by default they count real tokens per row, continuing
            from the cache.
        kv_cache: a `KVCache`; the new keys/values are appended to it and it advances.
        labels: (batch, seq) target ids already aligned with the inputs (the next token of each
            position; IGNORE_INDEX where unscored). The loss is computed chunk by chunk from the
            hidden states (`llmkit.losses`), so the logits are never materialised. Going through
            `forward` keeps DDP, FSDP2 and torch.compile wrappers in the path. An encoder's (MLM)
            labels are the original tokens at the masked positions, unshifted.
        token_type_ids: segment ids (batch, seq) of a model with `type_vocab_size`; zeros by default.
        inputs_embeds, before_block: what a vision-language model (llmkit/vision) changes; see `hidden_states`.
        scored_logits: with `labels`, return the logits (n_scored, vocab) of the scored positions instead of
            the loss (MLM scores 15 % of the positions: the head runs on those only).
        """
        if self.lm_head is None:
            raise ConfigError(f"this model is a classifier (num_labels={self.config.num_labels}) without "
                              "an LM head; call model.classify(input_ids, attention_mask)")
        hidden = self.hidden_states(input_ids, attention_mask, positions, kv_cache, token_type_ids,
                                    inputs_embeds=inputs_embeds, before_block=before_block)
        if labels is None:
            return self.logits(hidden)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None and not scored_logits:
            return linear_cross_entropy(hidden, self.lm_head.weight, labels, softcap=self.config.logit_softcap)
        # A rewritten head (LoRA, quantized) or an MLM head computes its own logits, for the scored positions only.
        scored = labels != IGNORE_INDEX
        logits = self.logits(hidden[scored])
        if scored_logits:
            return logits
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[scored])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (from `hidden_states`): BERT's MLM transform first if any, and
        soft-capped, cap * tanh(logits / cap), with `logit_softcap` (Gemma-2, the speedruns)."""
        logits = self.lm_head(self._mlm_transform(hidden))
        cap = self.config.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _mlm_transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """BertForMaskedLM's transform before the decoder: LayerNorm(act(dense(h))); nothing without an MLM head."""
        if self.mlm_dense is None:
            return hidden
        return self.mlm_norm(_ACTIVATIONS[self.config.activation](self.mlm_dense(hidden)))

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (batch, num_labels) (a reward when num_labels is 1) read off the token that
        `config.pooling` names (a decoder's last real token, an encoder's first), so right- and
        left-padded batches give each row's unpadded result; BERT's pooler (tanh(dense)) first if any
        (RoFormer's: the blocks' activation)."""
        if self.score is None:
            raise ConfigError("this model has no classification head; build it with num_labels > 0 "
                              "(ModelConfig.replace(num_labels=N))")
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids=token_type_ids)
        pooled = pool(hidden, attention_mask, self.config.pooling)
        if self.pooler is not None:
            act = self.config.pooler_activation
            pooled = (torch.tanh if act == "tanh" else _ACTIVATIONS[act])(self.pooler(pooled))
        return self.score(pooled)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, kv_cache=None, token_type_ids=None,
                      attentions: list[torch.Tensor] | None = None, inputs_embeds: torch.Tensor | None = None,
                      before_block: BeforeBlock | None = None):
        """The final-norm hidden states (batch, seq, d_model) that the LM head (or any head) reads.

        Checks its inputs, writes the new keys/values into `kv_cache` (if any) and advances it. Given a
        list as `attentions` (transformers' `output_attentions`), attention runs eagerly and appends
        each layer's softmax weights (batch, n_head, queries, keys) to it, in fp32.
        Two doors for llmkit/vision: `inputs_embeds` (batch, seq, d_model) replaces `embed_tokens(input_ids)`
        (image features spliced in, LLaVA; `input_ids` still give the shape), and `before_block(i, x)`
        returns the hidden states block i reads (gated cross-attention layers, Llama 3.2 vision)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if inputs_embeds is not None and inputs_embeds.shape != (B, T, self.config.d_model):
            raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}; expected ({B}, {T}, "
                             f"{self.config.d_model}) for input_ids of shape ({B}, {T})")
        past = kv_cache.length if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.max_seq_len
        if past + T > limit:
            raise ConfigError(f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the "
                              f"{'KV cache' if kv_cache is not None else 'model context'} of {limit}")
        new_mask = self._new_token_mask(attention_mask, B, T, past)
        if positions is None:
            positions = self._positions(new_mask, B, T, kv_cache, input_ids.device)
        if self.pos_embed is not None and int(positions.max()) >= self.config.max_seq_len:
            raise ConfigError(f"position {int(positions.max())} is beyond the learned position table "
                              f"of {self.config.max_seq_len}")
        step = Step(past, self._masks(new_mask, T, past, kv_cache, input_ids.device), attentions)
        hidden = self._trunk(input_ids, positions, step, kv_cache, token_type_ids, inputs_embeds, before_block)
        if kv_cache is not None:
            kv_cache.length = past + T
            kv_cache.next_position += T if new_mask is None else new_mask.sum(1)
        return hidden

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                    key_mask: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Logits (batch, 1, vocab) for one new token per row, with shapes that never change.

        The entry of the trunk for `torch.compile` (gpt-fast's static cache): keys/values are written at
        cache slot `slot` (a 0-d long tensor) and attention reads the whole preallocated cache, masked
        by `key_mask` (bool, batch x max_len, true for the slots each row may see, `slot` included).
        `positions` (batch, 1) are the tokens' position ids. Its caller (generate.engine.DecodeStep)
        has checked the inputs and keeps the cache's bookkeeping (`valid`, `length`, `next_position`).
        """
        slot = slot.reshape(1)
        masks = {}
        for layer, kind in self.kind_layers.items():
            visible = key_mask
            if kv_cache.windows[layer] is not None:  # a ring: its entries hold the window's slots
                k_slots = kv_cache.key_slots(layer, slot, 1)
                visible = key_mask.gather(1, k_slots.clamp(min=0).expand(key_mask.shape[0], -1)) & (k_slots >= 0)
            elif kind == SLIDING:  # a window as long as the cache: mask the slots it has left behind
                visible = key_mask & (kv_cache.key_slots(layer, slot, 1) > slot - self.config.sliding_window)
            masks[kind] = (visible[:, None, None, :], False)
        return self.logits(self._trunk(input_ids, positions, Step(slot, masks), kv_cache))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the first block sees them before positions (Gemma's scale applied)."""
        x = self.embed(input_ids)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.d_model ** 0.5, dtype=x.dtype)  # rounded to the dtype, as Gemma does
        return x

    def _trunk(self, input_ids: torch.Tensor, positions: torch.Tensor, step: Step,
               kv_cache: KVCache | None, token_type_ids: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None, before_block: BeforeBlock | None = None) -> torch.Tensor:
        """embed -> positions -> blocks -> final norm: the one forward every entry point runs."""
        c = self.config
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if self.type_embed is not None:
            x = x + self.type_embed(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        ropes = {}
        if self.pos_embedding_is_rope:
            ropes = {kind: rope_cos_sin(c, positions, x.dtype, kind) for kind in step.masks}
        n, skips = len(self.blocks), []
        half = n // 2 if self.skip_weights is not None else 0
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            if i >= n - half:  # U-net: the second half takes the first half's outputs, last in first out
                x = x + self.skip_weights[i - (n - half)] * skips.pop()
            x = block(x, ropes.get(block.attn.kind), step, kv_cache)
            if i < half:
                skips.append(x)
        return self.norm(x)

    @property
    def pos_embedding_is_rope(self) -> bool:
        return self.config.pos_embedding == "rope"

    @staticmethod
    def _new_token_mask(attention_mask, B, T, past):
        """The padding mask of the new tokens as bool (B, T), or None when nothing is padded."""
        if attention_mask is None:
            return None
        if attention_mask.shape not in ((B, T), (B, past + T)):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"({B}, {T}) for the new tokens or ({B}, {past + T}) for cached + new")
        mask = attention_mask[:, -T:].bool()
        return None if bool(mask.all()) else mask

    @staticmethod
    def _positions(new_mask, B, T, kv_cache, device):
        start = kv_cache.next_position[:, None] if kv_cache is not None else torch.zeros(B, 1, dtype=torch.long,
                                                                                         device=device)
        if new_mask is None:
            return start + torch.arange(T, device=device)
        return start + (new_mask.long().cumsum(1) - 1).clamp(min=0)

    def _masks(self, new_mask, T, past, kv_cache, device) -> dict[str, tuple[torch.Tensor | None, bool]]:
        """SDPA's (mask, is_causal) for each layer kind; the common cases need no mask tensor at all.
        An encoder's queries see every real key of their row."""
        if not self.config.causal:
            return dict.fromkeys(self.kind_layers.values(), (None if new_mask is None else new_mask[:, None, None, :], False))
        if kv_cache is not None:
            kv_cache.valid[:, past:past + T] = True if new_mask is None else new_mask
            padded = not bool(kv_cache.valid[:, :past + T].all())
        else:
            padded = new_mask is not None
        q_slots = torch.arange(past, past + T, device=device)
        masks = {}
        for layer, kind in self.kind_layers.items():
            window = self.config.sliding_window if kind == SLIDING else None
            if not padded and T == 1:
                masks[kind] = (None, False)  # one new token sees every key the cache returns
            elif not padded and past == 0 and (window is None or T <= window):
                masks[kind] = (None, T > 1)
            elif kv_cache is None:
                masks[kind] = (_mask(q_slots, q_slots, new_mask, window), False)
            else:
                k_slots = kv_cache.key_slots(layer, past, T)
                key_valid = kv_cache.valid[:, k_slots.clamp(min=0)] if padded else None
                masks[kind] = (_mask(q_slots, k_slots, key_valid, window), False)
        return masks

    # ---- accounting ---------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied LM head counts once), as transformers counts them."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if self.pos_embed is not None:
                total -= self.pos_embed.weight.numel()
            if self.type_embed is not None:
                total -= self.type_embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token: 2 per weight (LM head included even when tied) plus attention
        scores and mixing (2·2·seq·n_head·head_dim per layer, the window in place of seq on a sliding
        layer); training triples the forward (PaLM, appendix B). `seq_len` defaults to the model's context."""
        c = self.config
        seq_len = seq_len or c.max_seq_len
        weights = self.num_parameters(exclude_embeddings=True)
        weights -= inactive_parameters(c)  # a token runs experts_per_token of each layer's experts
        if c.tie_embeddings:
            weights += self.lm_head.weight.numel()
        norms = sum(p.numel() for n, p in self.named_parameters() if p.dim() < 2)
        attended = sum(min(seq_len, c.sliding_window) if c.layer_type(i) == SLIDING else seq_len
                       for i in range(c.n_layer))  # keys per query, summed over layers
        forward = 2 * (weights - norms) + 4 * attended * c.n_head * c.head_dim
        return 3 * forward if training else forward

    # ---- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Transformer:
        """Load a Hugging Face checkpoint folder (gpt2, llama, qwen2, gemma3_text), a `.gguf` file (dequantized
        to float32), or a registry name such as `smollm2-135m-instruct` (fetched and cached)."""
        from llmkit.formats import named

        config, tensors, _ = named.read(path, with_tokenizer=False)
        return cls.from_state_dict(config, tensors, dtype=dtype, device=device)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, tensors: dict[str, torch.Tensor],
                        dtype: torch.dtype | None = None, device=None) -> Transformer:
        """Build a model around already-named tensors without a wasted random initialisation."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(tensors, strict=True, assign=True)
        model.tie_weights()
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        max_shard_size: int | None = None) -> Path:
        """Write config.json + model.safetensors (sharded above `max_shard_size` bytes), atomically."""
        from llmkit.formats import hf

        return hf.save_checkpoint(Path(path), self.config, self.state_dict(), dtype=dtype,
                                  max_shard_size=max_shard_size)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector (batch, d) per row: the last real token, the first ("cls") or the mean of the real ones."""
    if how == "last":
        return pool_last(hidden, attention_mask)
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        weights = attention_mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    first = 0 if attention_mask is None else attention_mask.long().argmax(-1)  # the first real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The hidden state (batch, d) of each row's last real token (mask 1), wherever the padding is."""
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.bool() * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def load(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of an HF folder, a `.gguf` file, or a registry name (`smollm2-135m-instruct`)."""
    from llmkit.formats import named

    config, tensors, tokenizer = named.read(name_or_path)
    return Transformer.from_state_dict(config, tensors, dtype=dtype, device=device), tokenizer
