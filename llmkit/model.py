"""The Transformer: one decoder-only class whose variants (GPT-2, Llama, ...) are config fields.

Reads top to bottom: rotary embeddings, the KV cache, attention, MLP, block, model. Attention
goes through `F.scaled_dot_product_attention` (flash / memory-efficient kernels where the device
has them), grouped-query attention shares each key/value head across a group of query heads, and
a preallocated `KVCache` serves prefill followed by token-by-token decoding, including
left-padded batches of prompts with different lengths.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit import rope
from llmkit.config import ModelConfig
from llmkit.data.chat import IGNORE_INDEX
from llmkit.errors import ConfigError
from llmkit.losses import linear_cross_entropy
from llmkit.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Rotary position embeddings (the "rotate half" layout used by transformers' Llama)


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape (batch, seq, head_dim) for integer `positions` of shape (batch, seq)."""
    inv_freq, _ = rope.inv_freq(config.head_dim, config.rope_theta, config.rope_scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # fp32 even under autocast: positions are large
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of `x` (batch, heads, seq, head_dim) by the position angle."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values for every layer of one batch.

    `valid[b, s]` says whether cached slot s of row b holds a real token (left padding does not),
    and `next_position[b]` is the position id the next token of row b gets, so a left-padded batch
    decodes exactly as each prompt would alone.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        shape = (batch_size, config.n_kv_head, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.valid = torch.zeros(batch_size, self.max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far (the same for every row)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor):
        """Write this step's keys/values at `start` and return everything cached so far.

        A tensor `start` (the fixed-shape path of `Transformer.decode_step`) writes one slot in place
        and returns the whole preallocated buffers, so shapes never change from step to step.
        """
        if isinstance(start, torch.Tensor):
            self.keys[layer].index_copy_(2, start, k)
            self.values[layer].index_copy_(2, start, v)
            return self.keys[layer], self.values[layer]
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep row `rows[i]` as the new row i (beam search picks its beams; `n` samples copy a prompt)."""
        rows = rows.to(self.valid.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)

    @classmethod
    def stack(cls, caches: list[KVCache], room: int = 0) -> KVCache:
        """One cache with every row of `caches` (in order) and `room` free slots after the longest.

        Rows are right-aligned, so the next token of every row goes into the same slot, and leading
        slots that no row uses are dropped: a continuously batched decode joins new rows this way and
        compacts the cache when rows leave.
        """
        used = [int(c.valid[:, :c.length].any(0).int().argmax()) if c.batch_size else c.length for c in caches]
        length = max(c.length - u for c, u in zip(caches, used, strict=True))
        first = caches[0]
        _, heads, _, dim = first.keys[0].shape
        out = object.__new__(cls)
        out.max_len, out.length = length + room, length
        batch, like = sum(c.batch_size for c in caches), first.keys[0]
        out.keys = [like.new_zeros(batch, heads, out.max_len, dim) for _ in first.keys]
        out.values = [like.new_zeros(batch, heads, out.max_len, dim) for _ in first.keys]
        out.valid = first.valid.new_zeros(batch, out.max_len)
        out.next_position = torch.cat([c.next_position for c in caches])
        row = 0
        for c, u in zip(caches, used, strict=True):
            rows, span = slice(row, row + c.batch_size), c.length - u
            for new, old in zip(out.keys + out.values, c.keys + c.values, strict=True):
                new[rows, :, length - span:length] = old[:, :, u:c.length]
            out.valid[rows, length - span:length] = c.valid[:, u:c.length]
            row += c.batch_size
        return out

    def reset(self) -> None:
        self.valid.zero_()
        self.next_position.zero_()
        self.length = 0


# ---------------------------------------------------------------------------------------------
# Layers


def _norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=True)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=c.bias)
        self.qkv_proj = None  # q, k and v in one layer, set by inference-only rewrites (generate/fast.py)
        self.dropout = c.dropout

    def project_qkv(self, x):
        if self.qkv_proj is not None:
            return self.qkv_proj(x).split([self.n_head * self.head_dim, *[self.n_kv_head * self.head_dim] * 2], -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, mask, is_causal, kv_cache, layer, start):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, start)
        if T == 1 and self.n_kv_head != self.n_head:
            # One query per row (decoding): fold each group of query heads into the query axis of
            # its key/value head. Same result as enable_gqa, without SDPA's slow CPU path for it.
            q = q.view(B, self.n_kv_head, self.n_head // self.n_kv_head, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.o_proj(y.reshape(B, 1, self.n_head * self.head_dim))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) when gated (SwiGLU), else down(act(up(x))) (GPT-2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=c.bias) if c.gated_mlp else None
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=c.bias)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=c.bias)
        self.gate_up_proj = None  # gate and up in one layer, set by inference-only rewrites (generate/fast.py)
        self.act = _ACTIVATIONS[c.activation]

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, -1)
            return self.down_proj(self.act(gate) * up)
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = _norm(config)
        self.attn = Attention(config)
        self.mlp_norm = _norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, is_causal, kv_cache, start):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, is_causal, kv_cache, self.layer, start))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


# ---------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model) if c.pos_embedding == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layer))
        self.norm = _norm(c)
        # A classifier keeps an LM head only when it costs nothing (tied to the embedding), as in HF.
        lm = not c.num_labels or c.tie_embeddings
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False) if lm else None
        self.score = nn.Linear(c.d_model, c.num_labels, bias=False) if c.num_labels else None
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
                else:
                    p.fill_(1.0)  # norm gains
            else:
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj.weight",
                                                                                  "down_proj.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
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
            `forward` keeps DDP, FSDP2 and torch.compile wrappers in the path.
        """
        if self.lm_head is None:
            raise ConfigError(f"this model is a classifier (num_labels={self.config.num_labels}) without "
                              "an LM head; call model.classify(input_ids, attention_mask)")
        hidden = self.hidden_states(input_ids, attention_mask, positions, kv_cache)
        if labels is None:
            return self.lm_head(hidden)
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(hidden, self.lm_head.weight, labels)
        # A rewritten head (LoRA, quantized) computes its own logits, for the scored positions only.
        scored = labels != IGNORE_INDEX
        logits = self.lm_head(hidden[scored])
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[scored])

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (batch, num_labels) (a reward when num_labels is 1) read off the last real token
        of each row, so right- and left-padded batches give each row's unpadded result."""
        if self.score is None:
            raise ConfigError("this model has no classification head; build it with num_labels > 0 "
                              "(ModelConfig.replace(num_labels=N))")
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.score(pool_last(hidden, attention_mask))

    def hidden_states(self, input_ids, attention_mask=None, positions=None, kv_cache=None):
        """The final-norm hidden states (batch, seq, d_model) that the LM head (or any head) reads."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.max_seq_len
        if past + T > limit:
            raise ConfigError(f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds the "
                              f"{'KV cache' if kv_cache is not None else 'model context'} of {limit}")
        new_mask = self._new_token_mask(attention_mask, B, T, past)
        if positions is None:
            positions = self._positions(new_mask, B, T, past, kv_cache, input_ids.device)

        x = self.embed(input_ids)
        if self.pos_embed is not None:
            if int(positions.max()) >= self.config.max_seq_len:
                raise ConfigError(f"position {int(positions.max())} is beyond the learned position table "
                                  f"of {self.config.max_seq_len}")
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        rope = rope_cos_sin(self.config, positions, x.dtype) if self.pos_embedding_is_rope else None

        mask, is_causal = self._attention_mask(new_mask, B, T, past, kv_cache, input_ids.device)
        for block in self.blocks:
            x = block(x, rope, mask, is_causal, kv_cache, past)
        if kv_cache is not None:
            kv_cache.length = past + T
            kv_cache.next_position += T if new_mask is None else new_mask.sum(1)
        return self.norm(x)

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                    key_mask: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Logits (batch, 1, vocab) for one new token per row, with shapes that never change.

        The fixed-shape twin of `forward(..., kv_cache=...)` for one token, so that `torch.compile`
        traces it once for a whole decode loop (gpt-fast's static cache): keys/values are written at
        cache slot `slot` (a 0-d long tensor) and attention reads the whole preallocated cache,
        masked by `key_mask` (bool, batch x max_len, true for the slots each row may see, `slot`
        included). `positions` (batch, 1) are the tokens' position ids. It skips validation and the
        cache's bookkeeping (`valid`, `length`, `next_position`): its caller keeps those.
        """
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        rope = rope_cos_sin(self.config, positions, x.dtype) if self.pos_embedding_is_rope else None
        mask = key_mask[:, None, None, :]
        slot = slot.reshape(1)
        for block in self.blocks:
            x = block(x, rope, mask, False, kv_cache, slot)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **sampling):
        """Generate after each row of `input_ids` (batch, seq; left-padded where `attention_mask` is 0).

        Returns a long tensor (batch * n, seq + new) of prompt + generated tokens, padded on the right
        with the pad (or EOS) id, like transformers' `generate`. `sampling` takes the arguments of
        `llmkit.generate` (max_new_tokens, temperature, top_p, ..., num_beams for beam search).
        """
        from llmkit.generate.engine import generate_tensor

        return generate_tensor(self, input_ids, attention_mask, **sampling)

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
    def _positions(new_mask, B, T, past, kv_cache, device):
        start = kv_cache.next_position[:, None] if kv_cache is not None else torch.zeros(B, 1, dtype=torch.long,
                                                                                         device=device)
        if new_mask is None:
            return start + torch.arange(T, device=device)
        return start + (new_mask.long().cumsum(1) - 1).clamp(min=0)

    @staticmethod
    def _attention_mask(new_mask, B, T, past, kv_cache, device):
        """(mask, is_causal) for SDPA; the fast paths need no mask tensor at all."""
        if kv_cache is not None:
            kv_cache.valid[:, past:past + T] = True if new_mask is None else new_mask
            padded = not bool(kv_cache.valid[:, :past + T].all())
        else:
            padded = new_mask is not None
        if not padded:
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False  # one new token sees every cached one
        key_valid = kv_cache.valid[:, :past + T] if kv_cache is not None else new_mask
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past + T, device=device)[None, :]
        causal = k_pos <= q_pos  # (T, S)
        if key_valid is None:
            return causal, False
        # A padding query would see no key at all (and SDPA would return NaN); let it see itself.
        mask = (causal & key_valid[:, None, :]) | (k_pos == q_pos)
        return mask[:, None], False

    # ---- accounting ---------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied LM head counts once), as transformers counts them."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if self.pos_embed is not None:
                total -= self.pos_embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        """Matmul FLOPs per token: 2 per weight (LM head included even when tied) plus attention
        scores and mixing (2·2·n_layer·seq·n_head·head_dim); training triples the forward (PaLM,
        appendix B). `seq_len` defaults to the model's context."""
        c = self.config
        seq_len = seq_len or c.max_seq_len
        weights = self.num_parameters(exclude_embeddings=True)
        if c.tie_embeddings:
            weights += self.lm_head.weight.numel()
        norms = sum(p.numel() for n, p in self.named_parameters() if p.dim() < 2)
        forward = 2 * (weights - norms) + 4 * c.n_layer * seq_len * c.n_head * c.head_dim
        return 3 * forward if training else forward

    # ---- checkpoints --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Transformer:
        """Load a Hugging Face checkpoint folder (model_type gpt2 or llama), a `.gguf` file (dequantized
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
