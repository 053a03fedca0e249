"""`prepare`: sources -> cleaned, filtered, deduplicated, split and mixed text, with a report.

The output folder holds `train.jsonl` and `val.jsonl` (one `{"id", "source", "text"}` per line),
`report.json` (every count, the mixture, the licenses) and `report.md` (the same, for a person).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from llmkit.data import corpora, sources
from llmkit.data.corpora import Document
from llmkit.data.split import hold_out
from llmkit.data.text import (
    Quality,
    Report,
    dedup_exact,
    dedup_lines,
    dedup_near,
    mix,
    normalize,
    quality_reason,
    scrub_pii,
    strip_boilerplate,
)
from llmkit.errors import ConfigError, DataError
from llmkit.files import atomic_path, atomic_write_json, atomic_write_text, read_jsonl_rows


@dataclass
class PrepareConfig:
    val_fraction: float = 0.01
    near_dup_threshold: float = 0.7
    line_dedup_min_docs: int = 3
    line_dedup_min_chars: int = 60
    seed: int = 0
    max_docs_per_source: int | None = None  # for quick runs: the first N documents of each source
    total_chars: int | None = None  # mixture size; None: as large as possible without repeating a source
    quality: Quality = field(default_factory=Quality)


def parse_weights(spec: str) -> dict[str, float]:
    """'a:0.5,b:0.5' -> {'a': 0.5, 'b': 0.5}; a name without weight gets 1."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, w = part.partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"--sources entry {part!r} has weight {w!r}; expected NAME:NUMBER, e.g. kjv:0.5") from None
        if weight < 0:
            raise ConfigError(f"--sources entry {part!r} has a negative weight; expected a weight >= 0")
        weights[name] = weight
    if not weights or sum(weights.values()) <= 0:
        raise ConfigError(f"--sources {spec!r} names no source with a positive weight; expected e.g. kjv:0.5,bbcnews:0.5")
    return weights


def clean(docs: Iterable[Document], report: Report, config: PrepareConfig, progress: bool = False) -> list[Document]:
    """The per-document rules, then the corpus-level ones; every removal and edit counted in `report`."""
    docs = list(docs)
    for rule, fn in (("normalize", normalize), ("boilerplate", strip_boilerplate), ("pii", scrub_pii)):
        for doc in tqdm(docs, desc=rule, disable=not progress, leave=False):
            before, doc.text = doc.text, fn(doc.text)
            report.edit(rule, doc, before)
    kept = []
    for doc in docs:
        if doc.text:
            kept.append(doc)
        else:
            report.remove("empty", doc)
    kept = dedup_lines(kept, report, config.line_dedup_min_docs, config.line_dedup_min_chars)
    good = []
    for doc in tqdm(kept, desc="quality", disable=not progress, leave=False):
        reason = quality_reason(doc.text, config.quality)
        if reason:
            report.remove(f"quality:{reason}", doc)
        else:
            good.append(doc)
    good = dedup_exact(good, report)
    return dedup_near(good, report, threshold=config.near_dup_threshold, seed=config.seed + 1)


def prepare(weights: dict[str, float], out: str | os.PathLike, config: PrepareConfig | None = None,
            progress: bool = True) -> dict:
    """Run the pipeline on the registry sources in `weights` and write the output folder; return the report."""
    config = config or PrepareConfig()
    unknown = [n for n in weights if n not in corpora.READERS]
    if unknown:
        raise DataError(f"--sources names {unknown}, which are not text sources; expected some of: "
                        f"{', '.join(sorted(corpora.READERS))}")
    t0 = time.time()
    report, raw = Report(), Counter()
    docs: list[Document] = []
    for name in tqdm(list(weights), desc="read", disable=not progress):
        for i, doc in enumerate(corpora.documents(name)):
            if config.max_docs_per_source is not None and i >= config.max_docs_per_source:
                break
            docs.append(doc)
            raw[name] += 1
    if not docs:
        raise DataError(f"sources {list(weights)} gave no documents; expected a non-empty corpus")
    docs = clean(docs, report, config, progress)
    if not docs:
        raise DataError(f"every document of {list(weights)} was removed by the rules ({report.to_dict()['removed']}); "
                        "expected some to survive; loosen the quality thresholds")
    train, val = split_documents(docs, config.val_fraction)
    train, mixture = mix(train, weights, seed=config.seed, total_chars=config.total_chars)
    val, _ = mix(val, weights, seed=config.seed, total_chars=None)
    out = Path(out)
    for name, part in (("train", train), ("val", val)):
        write_documents(out / f"{name}.jsonl", part)
    result = {
        "sources": {n: {"weight": w, "documents_read": raw[n], "requirement": sources.get(n).requirement,
                        "license": sources.get(n).license, "sha256": sources.get(n).sha256} for n, w in weights.items()},
        "config": asdict(config),
        "rules": report.to_dict(),
        "kept": {"documents": len(docs), "by_source": dict(Counter(d.source for d in docs))},
        "split": {"train_documents": len(train), "val_documents": len(val),
                  "train_chars": sum(len(d.text) for d in train), "val_chars": sum(len(d.text) for d in val)},
        "mixture": mixture,
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_json(out / "report.json", result)
    atomic_write_text(out / "report.md", render_report(result))
    return result


def split_documents(docs: Sequence[Document], fraction: float = 0.01) -> tuple[list[Document], list[Document]]:
    """(train, validation), by document, by a hash of (source, id): stable across runs and orders; a
    source with a single document goes to train whole."""
    by_source = Counter(d.source for d in docs)
    return hold_out(docs, fraction, key=lambda d: f"{d.source}\0{d.id}" if by_source[d.source] > 1 else None)


def write_documents(path: Path, docs: Iterable[Document]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")


def read_documents(path: str | os.PathLike) -> list[Document]:
    """Documents written by `prepare` (one JSON object per line with id, source, text)."""
    expected = "a train.jsonl/val.jsonl written by `llmkit data prepare` (JSON objects with 'id' and 'text')"
    docs = []
    for where, row in read_jsonl_rows(path, expected):
        try:
            docs.append(Document(str(row["id"]), row["text"], row.get("source", "")))
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{where}: not a JSON object with 'id' and 'text'; expected {expected}") from None
    return docs


def render_report(r: dict) -> str:
    """report.md: what went in, what each rule removed per source, what came out."""
    names = list(r["sources"])
    lines = ["# Data preparation report", "", "## Sources", "",
             "| source | package | weight | documents read | kept | license |", "|---|---|---|---|---|---|"]
    for n, s in r["sources"].items():
        lines.append(f"| {n} | {s['requirement']} | {s['weight']} | {s['documents_read']} | "
                     f"{r['kept']['by_source'].get(n, 0)} | {s['license']} |")
    for title, key in (("Documents removed per rule", "removed"), ("Documents edited per rule", "edited"),
                       ("Characters removed per rule", "chars_removed")):
        lines += ["", f"## {title}", "", "| rule | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        rules = r["rules"].get(key, {})
        if not rules:
            lines.append("| (none) |" + " |" * len(names))
        for rule, counts in sorted(rules.items()):
            lines.append(f"| {rule} | " + " | ".join(str(counts.get(n, 0)) for n in names) + " |")
    sp = r["split"]
    lines += ["", "## Split", "", f"- train: {sp['train_documents']} documents, {sp['train_chars']:,} characters",
              f"- validation: {sp['val_documents']} documents, {sp['val_chars']:,} characters", "",
              "## Mixture (train)", "", "| source | weight | documents | characters | share | epochs |", "|---|---|---|---|---|---|"]
    for n, m in r["mixture"].items():
        lines.append(f"| {n} | {m['weight']:.3f} | {m['documents']} | {m['chars']:,} | {m['share']:.3f} | {m['epochs']} |")
    lines += ["", f"Took {r['seconds']} s.", ""]
    return "\n".join(lines)
