"""Prefix caching: the keys and values of recent prompts, kept in blocks of `block` tokens, so a prompt
that starts like an earlier one (the next turn of a chat, a shared system prompt, few-shot examples)
skips recomputing that start.

A block is found by a chain of hashes over the prompt's full blocks (each block's key hashes its
parent's key and its own tokens, as vLLM's block hashes do), and is verified against the tokens it
stores, so a hash collision can never reuse the wrong keys. Blocks are evicted least recently used
once more than `capacity` tokens are held; a prompt's blocks are touched last-first, so its deepest
blocks go before the shared prefix they hang from (a deep block is useless without its parents). Positions are absolute and a reused prefix sits at the
same positions, so the cached keys (rotary embedding applied) are exactly what the prompt's own
prefill would write there. Layers whose sliding window is shorter than the prompt keep a ring buffer
instead of every slot; such prompts are neither cached nor served from the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from llmkit.model import KVCache, Transformer


@dataclass
class Block:
    parent: int  # the previous block's key (0 for the first block)
    tokens: tuple[int, ...]
    keys: torch.Tensor  # (layers, kv_heads, block, head_dim)
    values: torch.Tensor


class PrefixCache:
    def __init__(self, model: Transformer, capacity: int, block: int = 16):
        self.model, self.block, self.capacity = model, block, capacity
        self.blocks: OrderedDict[int, Block] = OrderedDict()

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.block

    def _chain(self, prompt: list[int], upto: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """(key, parent key, tokens) of each full block within the first `upto` tokens."""
        out, parent = [], 0
        for start in range(0, upto - self.block + 1, self.block):
            tokens = tuple(prompt[start:start + self.block])
            key = hash((parent, tokens))
            out.append((key, parent, tokens))
            parent = key
        return out

    def lookup(self, prompt: list[int]) -> KVCache | None:
        """A one-row cache sized for `prompt` that already holds its longest cached prefix (at least
        one token is left to compute, whose logits start the generation), or None on a miss."""
        cache = KVCache(self.model.config, 1, len(prompt), device=self.model.device, dtype=self.model.dtype)
        if any(w is not None for w in cache.windows):
            return None
        hits = []
        for key, parent, tokens in self._chain(prompt, len(prompt) - 1):
            block = self.blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            hits.append((key, block))
        self._touch([key for key, _ in hits])
        if not hits:
            return None
        length = len(hits) * self.block
        for layer in range(len(cache.keys)):
            cache.keys[layer][0, :, :length] = torch.cat([b.keys[layer] for _, b in hits], dim=1)
            cache.values[layer][0, :, :length] = torch.cat([b.values[layer] for _, b in hits], dim=1)
        cache.valid[:, :length] = True
        cache.length = length
        cache.next_position += length
        return cache

    def insert(self, prompt: list[int], cache: KVCache, row: int = 0, offset: int = 0) -> None:
        """Keep the full blocks of `prompt`, whose keys and values fill row `row` of `cache` from slot
        `offset` on (a left-padded batch: the padding before it)."""
        if self.capacity < self.block or any(w is not None for w in cache.windows):
            return
        chain = self._chain(prompt, len(prompt))
        for index, (key, parent, tokens) in enumerate(chain):
            if key not in self.blocks:
                span = slice(offset + index * self.block, offset + (index + 1) * self.block)
                self.blocks[key] = Block(parent, tokens, torch.stack([k[row, :, span] for k in cache.keys]).clone(),
                                         torch.stack([v[row, :, span] for v in cache.values]).clone())
        self._touch([key for key, _, _ in chain])
        while self.tokens > self.capacity:
            self.blocks.popitem(last=False)

    def _touch(self, keys: list[int]) -> None:
        """Mark a chain's blocks as just used, its first block most recently."""
        for key in reversed(keys):
            self.blocks.move_to_end(key)
