"""The hybrid index: BM25 scores equal Lucene's formula computed by hand, dense scores equal
sentence-transformers' cosine similarities, hybrid is reciprocal-rank fusion of the two, a saved
index answers exactly like the built one, and bad input (another embedder or tokenizer, an empty
corpus, a missing or incomplete index folder) gets one clear error each."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from llmkit.embeddings import load_embedder
from llmkit.errors import ConfigError, DataError, FormatError
from llmkit.formats.named import resolve
from llmkit.rag import corpus, index
from llmkit.rag.index import RRF_K, Index, bm25_tokens

NAME = "all-minilm-l6-v2"
QUERIES = ["Which NFL team won Super Bowl 50?", "What is the capital city of France?", "tell me about the ocean"]


@pytest.fixture(scope="module")
def passages() -> list[dict]:
    """24 passages: the 6 SQuAD-style paragraphs of the suite's miniature BIG-bench (tests/data/bigbench: 3 on
    Super Bowl 50, 3 on honey bees) and 18 real Wikipedia leads."""
    squad = corpus.passages("squad")
    assert [p["id"] for p in squad] == ["squad:0.0", "squad:0.1", "squad:0.2", "squad:1.0", "squad:1.1", "squad:1.2"]
    assert squad[3]["title"] == "Honey bee"  # the article's title with "_" read as a space
    return squad + corpus.passages("wikipedia")[:18]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(NAME)


@pytest.fixture(scope="module")
def built(passages, embedder) -> Index:
    return index.build(passages, embedder)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    return built.save(tmp_path_factory.mktemp("rag") / "index")


def lucene_bm25(docs: list[list[str]], query: list[str], k1=1.5, b=0.75) -> list[float]:
    """BM25 as Lucene (8+) scores it, bm25s' default method, by hand: Robertson's idf with the +1 that keeps it
    positive, and tf / (tf + k1 * length norm) without the constant (k1 + 1) factor (Kamphuis et al. 2020)."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        s = 0.0
        for term in set(query):
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if df and tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                s += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(s)
    return scores


def texts(passages):
    return [f"{p['title']}: {p['text']}" for p in passages]


def test_bm25_scores_are_lucenes(built, passages):
    docs = bm25_tokens(texts(passages))
    for q in QUERIES:
        expected = lucene_bm25(docs, bm25_tokens([q])[0])
        hits = built.search(q, k=len(passages), mode="bm25")
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        assert len(hits) == sum(s > 0 for s in expected)  # passages sharing no word are not ranked
        for h in hits:  # bm25s stores scores as float32: 1e-5 relative
            assert h.score == pytest.approx(expected[passages.index(h.passage)], rel=1e-5)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_dense_scores_are_sentence_transformers_cosines(built, passages):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve(NAME)), device="cpu")
    sims = st.encode(QUERIES, convert_to_tensor=True) @ st.encode(texts(passages), convert_to_tensor=True).T
    for q, row in zip(QUERIES, sims, strict=True):
        hits = built.search(q, k=5, mode="dense")
        best = row.topk(5)
        assert [passages.index(h.passage) for h in hits] == best.indices.tolist()
        # float32 BERT in two implementations: cosines agree to ~1e-6; 1e-5 leaves room for summation order
        torch.testing.assert_close(torch.tensor([h.score for h in hits]), best.values.float(), atol=1e-5, rtol=0)


def test_hybrid_is_reciprocal_rank_fusion(built, passages):
    for q in QUERIES:
        fused = {}
        for mode in ("bm25", "dense"):
            for h in built.search(q, k=len(passages), mode=mode):
                fused[h.passage["id"]] = fused.get(h.passage["id"], 0) + 1 / (RRF_K + h.rank)
        order = [p["id"] for p in passages]  # a tie (ranks 2 and 3 in one list, 3 and 2 in the other): corpus order
        expected = sorted(fused.items(), key=lambda kv: (-kv[1], order.index(kv[0])))[:4]
        hits = built.search(q, k=4)
        assert [h.passage["id"] for h in hits] == [i for i, _ in expected]
        assert [h.score for h in hits] == pytest.approx([s for _, s in expected], rel=1e-12)
    assert built.search(QUERIES[0], k=1)[0].passage["title"] == "Super Bowl 50"


def test_a_saved_index_answers_like_the_built_one(built, saved, embedder):
    loaded = Index.load(saved, embedder)
    assert loaded.passages == built.passages and loaded.manifest == built.manifest
    assert loaded.manifest["passages"] == 24 and loaded.manifest["dim"] == 384
    assert loaded.manifest["bm25"]["library"] == "bm25s==0.3.16"
    for mode in index.MODES:
        for q in QUERIES:
            assert [(h.passage["id"], h.score) for h in loaded.search(q, 5, mode)] == \
                   [(h.passage["id"], h.score) for h in built.search(q, 5, mode)]
    assert not list(saved.parent.glob(".*"))  # no temporary folder left behind
    built.save(saved)  # over an existing index: replaced whole
    assert Index.load(saved, embedder).passages == built.passages


def test_another_embedder_or_tokenizer_is_refused(saved):
    other = load_embedder(NAME)  # a fresh copy: same weights, then one changed
    with torch.no_grad():
        next(iter(other.model.parameters()))[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="encoder weights differ"):
        Index.load(saved, other)
    fresh = load_embedder(NAME)
    fresh.tokenizer.backend.add_tokens(["zzzunseen"])
    with pytest.raises(ConfigError, match="tokenizer differ"):
        Index.load(saved, fresh)


def test_bad_corpora_and_folders_get_clear_errors(saved, tmp_path, embedder):
    with pytest.raises(ConfigError, match="corpus is empty"):
        index.build([], embedder)
    twice = [{"id": "a", "title": "", "text": "one"}, {"id": "a", "title": "", "text": "two"}]
    with pytest.raises(ConfigError, match="'a' occurs twice"):
        index.build(twice, embedder)
    with pytest.raises(ConfigError, match="embedder passed in memory"):
        Index.load(saved)  # built from an Embedder object: no name to load one by
    with pytest.raises(FormatError, match="no manifest.json"):
        Index.load(tmp_path / "nowhere", embedder)
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "embeddings.safetensors").unlink()
    with pytest.raises(FormatError, match="embeddings.safetensors is missing"):
        Index.load(broken, embedder)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": "x", "url": "y"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: unknown fields \['url'\]"):
        corpus.passages(str(rows))
    with pytest.raises(DataError, match="expected 'wikipedia', 'squad' or a JSONL"):
        corpus.passages("no-such-corpus")
    with pytest.raises(ConfigError, match="retrieval mode 'sparse'"):
        Index.load(saved, embedder).search("x", mode="sparse")


def test_long_documents_become_windows():
    text = " ".join(f"w{i}" for i in range(450))
    got = corpus.windows("doc", "T", text, max_words=200)
    assert [p["id"] for p in got] == ["doc#0", "doc#1", "doc#2"]
    assert " ".join(p["text"] for p in got) == text and all(p["title"] == "T" for p in got)
