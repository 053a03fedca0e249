"""Passages to index: the packaged Wikipedia leads, the SQuAD v1.1 dev paragraphs, or a JSONL file.

A passage is `{"id", "title", "text"}`; ids are unique within an index (`source:key`, with `#n` for
the n-th window of a long document), so an answer's citation names one stored passage.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.data import corpora, sources
from llmkit.errors import DataError
from llmkit.files import read_jsonl_rows

MAX_WORDS = 200  # a window of a long document: all-MiniLM-L6-v2 reads 256 word pieces, about 200 words
SQUAD_FILE = "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"


def windows(doc_id: str, title: str, text: str, max_words: int = MAX_WORDS) -> list[dict]:
    """A document as passages of at most `max_words` words (the whole of it when it is that short)."""
    words = text.split()
    if len(words) <= max_words:
        return [{"id": doc_id, "title": title, "text": " ".join(words)}] if words else []
    return [{"id": f"{doc_id}#{n}", "title": title, "text": " ".join(words[start:start + max_words])}
            for n, start in enumerate(range(0, len(words), max_words))]


def squad_articles() -> list[dict]:
    """SQuAD v1.1 dev (from the bigbench sdist): articles with their paragraphs and questions."""
    path = next((p for p in sources.files("bigbench") if p.as_posix().endswith(SQUAD_FILE)), None)
    if path is None:
        raise DataError(f"the bigbench source has no {SQUAD_FILE}")
    return json.loads(path.read_text(encoding="utf-8"))["data"]


def squad_passage_id(article: int, paragraph: int) -> str:
    return f"squad:{article}.{paragraph}"


def passages(corpus: str, max_words: int = MAX_WORDS) -> list[dict]:
    """The passages of `corpus`: "wikipedia", "squad", or a JSONL file of {"id", "title", "text"} rows."""
    if corpus == "wikipedia":
        return [p for d in corpora.documents("wikipedia") for p in windows(f"wikipedia:{d.id}", d.id, d.text, max_words)]
    if corpus == "squad":
        return [{"id": squad_passage_id(a, n), "title": article["title"].replace("_", " "), "text": para["context"]}
                for a, article in enumerate(squad_articles()) for n, para in enumerate(article["paragraphs"])]
    path = Path(corpus)
    if not path.is_file():
        raise DataError(f"corpus {corpus!r}: expected 'wikipedia', 'squad' or a JSONL file of "
                        '{"id", "title", "text"} rows; no such file')
    out = []
    for where, row in read_jsonl_rows(path, 'a passage {"id", "title", "text"}'):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{where}: expected an object with a string 'text' (and optional 'id', 'title')")
        unknown = set(row) - {"id", "title", "text"}
        if unknown:
            raise DataError(f"{where}: unknown fields {sorted(unknown)}; a passage has id, title and text")
        doc_id = str(row.get("id", f"{path.name}:{len(out)}"))
        out += windows(doc_id, str(row.get("title", "")), row["text"], max_words)
    return out
