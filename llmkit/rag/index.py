"""A hybrid retrieval index: BM25 (bm25s) and dense sentence embeddings, fused by reciprocal rank.

BM25 finds rare exact words (names, dates) that embeddings blur; embeddings find paraphrases that
share no word with the question; reciprocal-rank fusion (Cormack et al. 2009) needs no score
calibration between the two. The index is a folder in open formats, written whole to a temporary
folder and renamed into place (a killed build leaves the previous index, or none):

    manifest.json            format, embedder name and fingerprints, BM25 settings, corpus size
    passages.jsonl           {"id", "title", "text"} per passage, in index order
    embeddings.safetensors   "embeddings": (passages, dim) float32, unit length
    bm25/                    bm25s' own save format (sparse score matrix as .npy, vocabulary as JSON)

An index answers only queries embedded by the encoder it was built with: `Index.load` compares the
querying embedder's weights and tokenizer fingerprints with the manifest's and refuses a mismatch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import torch
from safetensors.torch import load_file, save_file

from llmkit.embeddings import DEFAULT_MODEL, Embedder, fingerprint, load_embedder
from llmkit.errors import ConfigError, FormatError
from llmkit.files import atomic_write_json, fsync_dir, read_json, read_jsonl_rows
from llmkit.progress import phase

FORMAT = "llmkit-rag-index/1"
RRF_K = 60  # reciprocal-rank fusion's constant, as Cormack et al. and most hybrid search engines use it
STOPWORDS = "en"
IN_MEMORY = "(in memory)"  # the manifest's embedder name when build() was given an Embedder, not a name
MODES = ("hybrid", "bm25", "dense")
MANIFEST_FIELDS = {"format", "embedder", "embedder_sha256", "tokenizer_sha256", "dim", "bm25", "passages",
                   "corpora"}


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased words without English stopwords: bm25s' tokenizer, the same for passages and queries."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


@dataclass
class Hit:
    passage: dict  # {"id", "title", "text"}
    score: float  # the fused score (hybrid), BM25 score or cosine similarity
    rank: int  # 1 = best


@dataclass
class Index:
    passages: list[dict]
    bm25: bm25s.BM25
    embeddings: torch.Tensor  # (passages, dim), unit rows
    embedder: Embedder
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int = 5, mode: str = "hybrid", depth: int = 100) -> list[Hit]:
        """The k best passages for `query`. Hybrid fuses the top `depth` of each ranking by 1 / (60 + rank)."""
        return self.search_many([query], k, mode, depth)[0]

    def search_many(self, queries: list[str], k: int = 5, mode: str = "hybrid", depth: int = 100) -> list[list[Hit]]:
        if mode not in MODES:
            raise ConfigError(f"retrieval mode {mode!r}; expected one of {', '.join(MODES)}")
        if k < 1:
            raise ConfigError(f"k={k}; expected at least 1 passage")
        k, depth = min(k, len(self)), min(max(depth, k), len(self))
        rankings = []
        if mode in ("bm25", "hybrid"):
            rankings.append(self._bm25(queries, depth if mode == "hybrid" else k))
        if mode in ("dense", "hybrid"):
            rankings.append(self._dense(queries, depth if mode == "hybrid" else k))
        if mode != "hybrid":
            return [[Hit(self.passages[i], s, r + 1) for r, (i, s) in enumerate(row)] for row in rankings[0]]
        out = []
        for per_query in zip(*rankings, strict=True):
            fused: dict[int, float] = {}
            for row in per_query:
                for r, (i, _) in enumerate(row):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + r + 1)
            best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
            out.append([Hit(self.passages[i], s, r + 1) for r, (i, s) in enumerate(best)])
        return out

    def _bm25(self, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
        """(passage, score) best first; passages that share no word with the query are not ranked."""
        vocab = self.bm25.vocab_dict
        tokens = [[t for t in q if t in vocab] for q in bm25_tokens(queries)]
        out: list[list[tuple[int, float]]] = [[] for _ in queries]
        asked = [i for i, t in enumerate(tokens) if t]
        if asked:
            docs, scores = self.bm25.retrieve([tokens[i] for i in asked], k=depth, show_progress=False,
                                              n_threads=0)
            for i, row_docs, row_scores in zip(asked, docs, scores, strict=True):
                out[i] = [(int(d), float(s)) for d, s in zip(row_docs, row_scores, strict=True) if s > 0]
        return out

    def _dense(self, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
        sims = self.embedder(queries) @ self.embeddings.T
        scores, ids = sims.topk(depth, dim=1)
        return [list(zip(i.tolist(), s.tolist(), strict=True)) for i, s in zip(ids, scores, strict=True)]

    # ---- files ---------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder atomically (a temporary folder beside it, renamed into place)."""
        target = Path(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            self.bm25.save(str(tmp / "bm25"))
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp / "embeddings.safetensors"))
            (tmp / "passages.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                                        for p in self.passages), encoding="utf-8")
            atomic_write_json(tmp / "manifest.json", self.manifest)
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            old = None
            if target.exists():
                if not (target / "manifest.json").is_file():
                    raise ConfigError(f"{target} exists and is not a llmkit index; expected a new or index folder")
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, folder: str | os.PathLike, embedder: Embedder | str | None = None) -> Index:
        """The index in `folder`, queried through `embedder` (default: the one it was built with)."""
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise FormatError(f"{folder}: no manifest.json; expected an index folder written by `llmkit rag index`")
        manifest = read_json(manifest_path, "a llmkit rag index manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise FormatError(f"{manifest_path}: format {manifest.get('format') if isinstance(manifest, dict) else manifest!r}; "
                              f"expected {FORMAT!r}")
        unknown = set(manifest) - MANIFEST_FIELDS
        if unknown:
            raise FormatError(f"{manifest_path}: unknown fields {sorted(unknown)}; expected {sorted(MANIFEST_FIELDS)}")
        for name in ("passages.jsonl", "embeddings.safetensors", "bm25/params.index.json"):
            if not (folder / name).is_file():
                raise FormatError(f"{folder}: {name} is missing; the index folder is incomplete (rebuild it with "
                                  "`llmkit rag index`)")
        if embedder is None and manifest["embedder"] == IN_MEMORY:
            raise ConfigError(f"{folder} was built with an embedder passed in memory, not by name; pass the same "
                              "embedder to Index.load")
        if embedder is None or isinstance(embedder, str):
            embedder = load_embedder(embedder or manifest["embedder"])
        got = fingerprint(embedder)
        for key, what in (("embedder_sha256", "encoder weights"), ("tokenizer_sha256", "tokenizer")):
            if got[key] != manifest[key]:
                raise ConfigError(f"{folder} was built with the embedder {manifest['embedder']!r} ({what} sha256 "
                                  f"{manifest[key][:12]}...); the querying embedder's {what} differ (sha256 "
                                  f"{got[key][:12]}...): rebuild the index or query with the same embedder")
        passages = [row for _, row in read_jsonl_rows(folder / "passages.jsonl", "passages")]
        embeddings = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
        if embeddings.shape != (manifest["passages"], manifest["dim"]) or len(passages) != manifest["passages"]:
            raise FormatError(f"{folder}: {len(passages)} passages and embeddings {tuple(embeddings.shape)}; the "
                              f"manifest says {manifest['passages']} passages of dimension {manifest['dim']}")
        bm25 = bm25s.BM25.load(str(folder / "bm25"))
        return cls(passages, bm25, embeddings, embedder, manifest)


def build(passages: list[dict], embedder: Embedder | str = DEFAULT_MODEL, corpora: list[str] | None = None,
          batch_size: int = 64) -> Index:
    """Index `passages` ({"id", "title", "text"}) by BM25 and by `embedder`'s vectors of "title: text"."""
    if not passages:
        raise ConfigError("the corpus is empty: an index needs at least one passage with text")
    ids = [p["id"] for p in passages]
    if len(set(ids)) != len(ids):
        seen = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise ConfigError(f"passage id {twice!r} occurs twice; expected unique ids (a citation names one passage)")
    name = embedder if isinstance(embedder, str) else IN_MEMORY
    if isinstance(embedder, str):
        embedder = load_embedder(embedder)
    texts = [f"{p['title']}: {p['text']}" if p.get("title") else p["text"] for p in passages]
    bm25 = bm25s.BM25()
    with phase(f"BM25 over {len(texts)} passages"):
        bm25.index(bm25_tokens(texts), show_progress=False)
    with phase(f"embed {len(texts)} passages"):
        embeddings = embedder(texts, batch_size)
    manifest = {"format": FORMAT, "embedder": name, **fingerprint(embedder),
                "bm25": {"library": f"bm25s=={bm25s.__version__}", "method": bm25.method, "k1": bm25.k1,
                         "b": bm25.b, "stopwords": STOPWORDS},
                "passages": len(passages), "corpora": list(corpora or [])}
    return Index(list(passages), bm25, embeddings, embedder, manifest)
