"""Read a fetched source as documents: one reader per file layout, all yielding `Document`s.

The document is the unit of cleaning, dedup and the train/validation split, so each reader picks
the natural one: a play, a Wikipedia lead, a news article, a Bible chapter, a chat, a review.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmkit.data import sources
from llmkit.data.labelled import movie_reviews
from llmkit.errors import DataError


@dataclass
class Document:
    id: str  # stable within its source: used for the split and for reports
    text: str
    source: str


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")  # a few older corpora are not UTF-8


def _per_file(name: str) -> Iterator[Document]:
    root = sources.source_dir(name)
    for path in sources.files(name):
        if path.name != sources.MANIFEST:
            yield Document(str(path.relative_to(root)), _read_text(path), name)


def _passages(name: str, min_chars: int = 10_000) -> Iterator[Document]:
    """A single long text cut at blank lines into passages of about `min_chars` (tinyshakespeare is one file)."""
    for doc in _per_file(name):
        passage, n = [], 0
        for block in doc.text.split("\n\n"):
            passage.append(block)
            if sum(map(len, passage)) >= min_chars:
                yield Document(f"{doc.id}#{n}", "\n\n".join(passage), name)
                passage, n = [], n + 1
        if passage:
            yield Document(f"{doc.id}#{n}", "\n\n".join(passage), name)


def _wikipedia(name: str) -> Iterator[Document]:
    (path,) = sources.files(name)
    for title, entry in json.loads(path.read_text(encoding="utf-8")).items():
        yield Document(title, entry.get("extract") or "", name)


def _kjv(name: str) -> Iterator[Document]:
    (path,) = sources.files(name)
    chapter, verses = None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            key = f"{verse['book']} {verse['chapter']}"
            if key != chapter and verses:
                yield Document(chapter, "\n".join(verses), name)
                verses = []
            chapter = key
            verses.append(verse["text"])
    if verses:
        yield Document(chapter, "\n".join(verses), name)


def _chitchat(name: str) -> Iterator[Document]:
    (path,) = sources.files(name)
    for chat_id, chat in json.loads(path.read_text(encoding="utf-8")).items():
        turns = [" ".join(m["text"] for m in turn) for turn in chat["messages"]]
        yield Document(chat_id, "\n".join(turns), name)


def _movie_reviews(name: str) -> Iterator[Document]:
    for review in movie_reviews(source=None):
        yield Document(review.key, review.text, name)


READERS: dict[str, Callable[[str], Iterator[Document]]] = {
    "tinyshakespeare": _passages,
    "shakespeare": _per_file,
    "bbcnews": _per_file,
    "wikipedia": _wikipedia,
    "kjv": _kjv,
    "chitchat": _chitchat,
    "movie_reviews": _movie_reviews,
}


def documents(name: str) -> Iterator[Document]:
    """The documents of text source `name`, fetching it first if needed."""
    if name not in READERS:
        raise DataError(f"source {name!r} has no text reader; expected one of: {', '.join(sorted(READERS))}")
    return READERS[name](name)


def read_text_files(paths: list[Path], source: str = "files") -> Iterator[Document]:
    """Plain-text files as documents (for corpora on disk rather than in the registry)."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"corpus file {path} does not exist; expected a readable UTF-8 text file")
        yield Document(path.name, _read_text(path), source)
