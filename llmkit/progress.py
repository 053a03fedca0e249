"""Named progress for the phases a user waits on: a tqdm bar over work of known size, or a line when
the phase starts and one with its time when it ends, so nothing long runs in silence; and warnings
about settings that run but probably not as meant. On stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def bar(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    """`items` with a bar named `desc` (it goes away when done; the phase's result is printed by its caller)."""
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def phase(name: str, enabled: bool = True) -> Iterator[None]:
    """`name ...` when the phase starts and `name: N.N s` when it ends."""
    if not enabled:
        yield
        return
    print(f"{name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A setting that runs but probably not as meant (one line, on stderr, above any bar)."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
