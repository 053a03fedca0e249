"""The one held-out rule: which items train and which are held out for validation or testing.

`hold_out` takes either a fixed sample after a seeded shuffle (a share, or counts, of a list that is
read whole), or, given `key`, every item whose key hashes below the share (membership that depends
on neither the order nor the other items: documents streamed from a corpus, reviews that must stay
test reviews whatever the sample size).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from llmkit.errors import DataError

T = TypeVar("T")
SALT = "llmkit-split"


def is_held_out(key: str, fraction: float) -> bool:
    """Whether `key` falls in the held-out share: a hash of it, so stable across runs and orders."""
    h = hashlib.sha256(f"{SALT}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def hold_out(items: Sequence[T], fraction: float | None = None, *, n_val: int | None = None,
             n_train: int | None = None, seed: int | None = 0,
             key: Callable[[T], str | None] | None = None) -> tuple[list[T], list[T]]:
    """(train, held out).

    Without `key`: shuffle with `random.Random(seed)` (`seed=None` keeps the order), hold out the
    first `n_val` items (default `max(1, round(len * fraction))`: at least one) and train on the rest,
    or on the next `n_train`. With `key`: hold out the items whose key `is_held_out` (a None key always
    trains), in their order."""
    if key is not None:
        if fraction is None or n_val is not None or n_train is not None:
            raise DataError("hold_out by key takes a fraction, not counts")
        train, held = [], []
        for item in items:
            k = key(item)
            (held if k is not None and is_held_out(k, fraction) else train).append(item)
        return train, held
    order = list(items)
    if seed is not None:
        random.Random(seed).shuffle(order)
    if n_val is None:
        if fraction is None:
            raise DataError("hold_out needs a fraction or n_val")
        n_val = max(1, round(len(order) * fraction))
    elif n_val + (n_train or 0) > len(order):
        raise DataError(f"asked for {n_val} held-out + {n_train or 0} training items but only {len(order)} exist")
    return (order[n_val:] if n_train is None else order[n_val:n_val + n_train]), order[:n_val]
