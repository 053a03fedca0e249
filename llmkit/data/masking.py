"""Masked-language-model batches (BERT, section 3.1): which tokens are chosen and what replaces them.

Each non-special token is chosen with probability `mask_prob` (15 %); of the chosen, 80 % become
[MASK], 10 % a random non-special token and 10 % stay as they are. The labels hold the original
token at the chosen positions and IGNORE_INDEX everywhere else, so the loss reads only those.
The masking belongs to the data (as transformers' DataCollatorForLanguageModeling): the objective
sees a finished batch, and the held-out batches are masked once, so every evaluation scores the
same positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmkit.data.collate import IGNORE_INDEX
from llmkit.errors import ConfigError


def mask_tokens(ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                generator: torch.Generator, mask_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for MLM from token ids of any shape: 80/10/10 of the chosen positions."""
    if not 0 < mask_prob < 1:
        raise ConfigError(f"mask_prob must be in (0, 1), got {mask_prob}")
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=ids.dtype)
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special[special < vocab_size]] = False
    allowed = ordinary.nonzero()[:, 0]  # what a random replacement may be
    if len(allowed) == 0:
        raise ConfigError("every token of the vocabulary is special; MLM needs ordinary tokens to mask")
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & ~torch.isin(ids, special)
    roll = torch.rand(ids.shape, generator=generator)
    replacement = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), replacement, inputs)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


class MaskedBatches:
    """MLM batches `{"input_ids", "labels", "at_mask"}` from a loader of `(x, y)` token windows (x is used);
    `at_mask` marks the positions that show [MASK] (where only the context can tell the token).

    Batch n's masks come from a generator seeded with (seed, n), so a resumed run masks exactly as
    the uninterrupted one; `state_dict` carries the wrapped loader's position and n."""

    def __init__(self, loader, mask_id: int, vocab_size: int, special_ids: Sequence[int], seed: int = 0,
                 mask_prob: float = 0.15):
        self.loader, self.mask_id, self.vocab_size = loader, mask_id, vocab_size
        self.special_ids, self.seed, self.mask_prob = list(special_ids), seed, mask_prob
        self.count = 0

    def mask(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.count)
        self.count += 1
        inputs, labels = mask_tokens(x, self.mask_id, self.vocab_size, self.special_ids, generator, self.mask_prob)
        return {"input_ids": inputs, "labels": labels, "at_mask": inputs == self.mask_id}

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.mask(self.loader.next_batch()[0])

    def state_dict(self) -> dict:
        return {**self.loader.state_dict(), "masked_batches": self.count}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.count = int(state.pop("masked_batches", 0))
        self.loader.load_state_dict(state)
