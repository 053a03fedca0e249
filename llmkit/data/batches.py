"""The one resumable batcher: shuffled micro-batches over a list of items, epoch after epoch.

Every recipe that trains on a list (SFT and classification examples, preference pairs) feeds the
training loop through `BatchLoader`, so all of them shuffle, finish an epoch and resume alike.
Token shards, a stream of fixed windows rather than a list, have their own `shards.ShardLoader`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from llmkit.errors import DataError


class BatchLoader:
    """Micro-batches of `batch_size` items, collated by `collate` (the loop's `data`), resumable.

    Seeding: epoch e visits the items in the permutation of `random.Random(seed * 1_000_003 + e)`, so
    no two (seed, epoch) pairs share an order and (epoch, index) is the whole state. Last batch: an
    epoch's last batch holds what is left (it may be smaller), so every item is seen once per epoch.
    """

    def __init__(self, items: Sequence, batch_size: int, collate: Callable[[Sequence], dict], seed: int = 0):
        if not items:
            raise DataError("no examples to train on; expected at least one")
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.items, self.batch_size, self.collate = items, batch_size, collate
        self.seed = seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self.items):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        picked = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self.collate([self.items[i] for i in picked])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._permutation()


def in_order(items: Sequence, batch_size: int, collate: Callable[[Sequence], dict]) -> list[dict[str, torch.Tensor]]:
    """Every item once, in order, in batches of `batch_size` (evaluation); none for no items."""
    return [collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
