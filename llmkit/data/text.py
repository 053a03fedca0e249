"""Document cleaning: one function per rule, each counted in a `Report`.

Rules that edit text (normalize, boilerplate, PII, repeated lines) return the new text; rules that
judge a document (the quality filters, in the style of Gopher, Rae et al. 2021, Table A1) return the
reason it fails or None. Corpus-level rules (exact and near-duplicate removal, repeated lines, the
mixture) take the list of documents. `prepare` (in `llmkit.data.prepare`) chains them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmkit.data.corpora import Document

# ---- the report ---------------------------------------------------------------------------------


@dataclass
class Report:
    """Counts per rule and per source: documents removed, documents edited, characters removed."""

    removed: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    edited: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    chars_removed: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def remove(self, rule: str, doc: Document) -> None:
        self.removed[rule][doc.source] += 1
        self.chars_removed[rule][doc.source] += len(doc.text)

    def edit(self, rule: str, doc: Document, before: str) -> None:
        if doc.text != before:
            self.edited[rule][doc.source] += 1
            self.chars_removed[rule][doc.source] += max(0, len(before) - len(doc.text))

    def to_dict(self) -> dict:
        def plain(d):
            return {rule: dict(sorted(c.items())) for rule, c in d.items() if c}
        return {"removed": plain(self.removed), "edited": plain(self.edited), "chars_removed": plain(self.chars_removed)}


# ---- text rules -----------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, one newline convention, no control or zero-width characters, single spaces, <= 1 blank line.

    NFC (not NFKC) keeps ligatures, superscripts and full-width text as the author wrote them.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_boilerplate(text: str) -> str:
    """Drop the Project Gutenberg header (up to its START marker) and license footer (from its END marker)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b|\b(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){1,6}\b")
# Phone numbers, in the shapes they are written: +country code, (area code), a trunk 0 (UK, Europe),
# or the US 555-123-4567; plain runs of numbers ("112 113 221", a list of class numbers) are left alone.
_PHONE = re.compile(
    r"(?<![\w.+-])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,5}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,3}"
    r"|\(\d{2,5}\)[ .-]?\d{3,4}[ .-]\d{3,4}"
    r"|0\d{2,4}[ .-]\d{3,4}[ .-]?\d{3,4}"
    r"|\d{3}([.-])\d{3}\1\d{4}"
    r")(?![\w-]|\.\d)"
)


def scrub_pii(text: str) -> str:
    """Replace e-mail addresses, IP addresses and phone numbers with <EMAIL>, <IP>, <PHONE>."""
    text = _EMAIL.sub("<EMAIL>", text)
    text = _IPV6.sub("<IP>", text)
    text = _IPV4.sub("<IP>", text)
    return _PHONE.sub(lambda m: "<PHONE>" if sum(c.isdigit() for c in m.group()) >= 9 else m.group(), text)


# ---- quality filters (Gopher-style) -------------------------------------------------------------


@dataclass
class Quality:
    """Thresholds of the quality rules. Defaults follow Gopher, except where they would drop plays.

    Plays repeat speaker names on lines of their own, so duplicate lines shorter than
    `dup_line_min_chars` are not counted as repetition.
    """

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    max_symbol_ratio: float = 0.1  # '#' and '...' per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8  # words with at least one letter
    min_stop_words: int = 2
    max_dup_lines: float = 0.3  # fraction of (long) lines that duplicate an earlier one
    max_dup_line_chars: float = 0.2
    dup_line_min_chars: int = 20
    max_top_ngram: tuple[float, ...] = (0.2, 0.18, 0.16)  # n = 2, 3, 4
    max_dup_ngram: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5..10


STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_WORD = re.compile(r"\S+")


def check_length(words: list[str], q: Quality) -> str | None:
    if not q.min_words <= len(words) <= q.max_words:
        return "length"
    mean = sum(map(len, words)) / len(words)
    return None if q.min_mean_word_len <= mean <= q.max_mean_word_len else "length"


def check_symbols(text: str, words: list[str], q: Quality) -> str | None:
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return "symbols" if symbols / max(1, len(words)) > q.max_symbol_ratio else None


def check_lines(lines: list[str], q: Quality) -> str | None:
    """Bullet and ellipsis line ratios; a text of one or two lines (a review, a lead) is not judged by lines."""
    if len(lines) < 3:
        return None
    bullets = sum(line.lstrip().startswith(("\u2022", "*", "-", "\u2013", "\u00b7")) for line in lines)
    ellipsis = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines)
    if bullets / len(lines) > q.max_bullet_lines or ellipsis / len(lines) > q.max_ellipsis_lines:
        return "lines"
    return None


def check_alpha(words: list[str], q: Quality) -> str | None:
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    return "alpha" if alpha / max(1, len(words)) < q.min_alpha_words else None


def check_stop_words(words: list[str], q: Quality) -> str | None:
    found = sum(w.lower().strip(".,;:!?'\"()") in STOP_WORDS for w in words)
    return "stop_words" if found < q.min_stop_words else None


def check_repeated_lines(lines: list[str], q: Quality) -> str | None:
    long = [line for line in lines if len(line) >= q.dup_line_min_chars]
    if not long:
        return None
    counts = Counter(long)
    dup_lines = sum(c - 1 for c in counts.values())
    dup_chars = sum(len(line) * (c - 1) for line, c in counts.items())
    total_chars = sum(map(len, lines))
    if dup_lines / len(long) > q.max_dup_lines or dup_chars / max(1, total_chars) > q.max_dup_line_chars:
        return "repeated_lines"
    return None


def check_repeated_ngrams(words: list[str], q: Quality) -> str | None:
    """Gopher's n-gram rules: the most common 2-4-gram, and all duplicated 5-10-grams, by character share."""
    words = [w.lower() for w in words]
    total = sum(map(len, words))
    if total == 0:
        return None
    for n, limit in zip(range(2, 5), q.max_top_ngram, strict=True):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(map(len, gram)) / total > limit:
                return "repeated_ngrams"
    for n, limit in zip(range(5, 11), q.max_dup_ngram, strict=True):
        seen: set[tuple] = set()
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                covered[i:i + n] = [True] * n
            seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total > limit:
            return "repeated_ngrams"
    return None


def quality_reason(text: str, q: Quality | None = None) -> str | None:
    """The first quality rule `text` fails (length, symbols, lines, alpha, stop_words, repeated_*), or None."""
    q = q or Quality()
    words = _WORD.findall(text)
    lines = [line for line in text.split("\n") if line.strip()]
    return (check_length(words, q) if words else "length") or check_symbols(text, words, q) or check_lines(lines, q) \
        or check_alpha(words, q) or check_stop_words(words, q) or check_repeated_lines(lines, q) \
        or check_repeated_ngrams(words, q)


# ---- corpus-level rules -------------------------------------------------------------------------


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def dedup_exact(docs: Sequence[Document], report: Report) -> list[Document]:
    """Keep the first copy of each distinct text (after normalization)."""
    seen: set[bytes] = set()
    kept = []
    for doc in docs:
        key = _digest(doc.text)
        if key in seen:
            report.remove("exact_dup", doc)
        else:
            seen.add(key)
            kept.append(doc)
    return kept


def dedup_lines(docs: Sequence[Document], report: Report, min_docs: int = 3, min_chars: int = 60) -> list[Document]:
    """Remove lines of >= `min_chars` that occur in >= `min_docs` documents (navigation, bylines, notices).

    Short lines are left alone: a play's stage directions and a holy book's refrains are content.
    A document left empty is removed.
    """
    df: Counter = Counter()
    for doc in docs:
        df.update({_digest(line) for line in doc.text.split("\n") if len(line) >= min_chars})
    common = {k for k, c in df.items() if c >= min_docs}
    kept = []
    for doc in docs:
        before = doc.text
        if common:
            lines = [line for line in before.split("\n") if len(line) < min_chars or _digest(line) not in common]
            doc.text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
        if not doc.text:
            doc.text = before
            report.remove("repeated_lines_corpus", doc)
            continue
        report.edit("repeated_lines_corpus", doc, before)
        kept.append(doc)
    return kept


def shingles(text: str, n: int = 3) -> set[bytes]:
    """Word n-grams of the lower-cased text, as the MinHash input."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def dedup_near(docs: Sequence[Document], report: Report, threshold: float = 0.7, num_perm: int = 128,
               ngram: int = 3, seed: int = 1) -> list[Document]:
    """Remove documents whose word-3-gram Jaccard similarity with an earlier one is above `threshold`.

    MinHash-LSH (datasketch) finds candidate pairs in linear time; a candidate is removed only when its
    estimated Jaccard similarity really passes the threshold.
    """
    from datasketch import MinHash, MinHashLSH

    if not docs:
        return []
    hashes = MinHash.bulk([shingles(d.text, ngram) for d in docs], num_perm=num_perm, seed=seed)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept = []
    for i, (doc, mh) in enumerate(zip(docs, hashes, strict=True)):
        if any(mh.jaccard(hashes[j]) >= threshold for j in lsh.query(mh)):
            report.remove("near_dup", doc)
            continue
        lsh.insert(i, mh)
        kept.append(doc)
    return kept


def mix(docs: Sequence[Document], weights: dict[str, float], seed: int = 0,
        total_chars: int | None = None) -> tuple[list[Document], dict]:
    """Sample documents so each source's share of characters is its weight.

    Without `total_chars` the mixture is as large as possible without repeating any source (the
    scarcest source relative to its weight sets the size); with it, a source may be repeated (its
    documents cycled in a shuffled order) or subsampled. Returns the documents, shuffled, and a
    summary per source (documents, characters, share, epochs).
    """
    import random

    by_source: dict[str, list[Document]] = defaultdict(list)
    for d in docs:
        by_source[d.source].append(d)
    total_w = sum(weights.values())
    sizes = {s: sum(len(d.text) for d in by_source.get(s, [])) for s in weights}
    live = {s: w / total_w for s, w in weights.items() if w > 0 and sizes[s] > 0}
    if not live:
        return [], {}
    if total_chars is None:
        total_chars = int(min(sizes[s] / w for s, w in live.items()))
    rng = random.Random(seed)
    out, summary = [], {}
    for s, w in sorted(live.items()):
        budget, taken, chars = w * total_chars, [], 0
        pool = list(by_source[s])
        epochs = 0
        while chars < budget:
            rng.shuffle(pool)
            epochs += 1
            for d in pool:
                if chars >= budget:
                    break
                taken.append(d)
                chars += len(d.text)
        out.extend(taken)
        summary[s] = {"weight": w, "documents": len(taken), "chars": chars, "epochs": epochs}
    total = sum(v["chars"] for v in summary.values())
    for v in summary.values():
        v["share"] = v["chars"] / total
    rng.shuffle(out)
    return out, summary
