"""The moderation classifier: its head is the logistic regression scikit-learn fits to the same
embeddings, its held-out split is the one held-out rule's and disjoint from training, its
precision/recall are the counts by hand, the word list matches whole words, and a saved moderator
loads back equal and refuses another embedder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from llmkit import moderation
from llmkit.embeddings import load_embedder
from llmkit.errors import ConfigError, FormatError


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def trained(embedder):
    return moderation.train(embedder)


def test_the_head_is_sklearns_logistic_regression(trained, embedder):
    train_rows, held = moderation.split(moderation.toxigen())
    assert {r["id"] for r in train_rows} == set(trained.meta["train_ids"]) and not set(trained.meta["train_ids"]) & \
        set(trained.meta["held_out_ids"]) and len(train_rows) + len(held) == 200
    x = embedder([r["text"] for r in train_rows]).double().numpy()
    y = np.array([r["toxic"] for r in train_rows])
    # ours: mean BCE + l2 |w|^2; sklearn: |w|^2 / 2 + C * sum BCE -> the same minimum at C = 1 / (2 n l2)
    ref = LogisticRegression(C=1 / (2 * len(y) * trained.meta["l2"]), tol=1e-10, max_iter=10_000).fit(x, y)
    texts = [r["text"] for r in held]
    ours = np.array(trained.hate_scores(texts))
    theirs = ref.predict_proba(embedder(texts).double().numpy())[:, 1]
    # two optimizers (L-BFGS in float32 vs lbfgs in float64) to one convex minimum: 2e-3 in probability
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_held_out_precision_recall_are_the_counts(trained):
    texts = {r["id"]: r for r in moderation.toxigen()}
    held = [texts[i] for i in trained.meta["held_out_ids"]]
    flags = [s >= 0.5 for s in trained.hate_scores([r["text"] for r in held])]
    tp = sum(f and r["toxic"] for f, r in zip(flags, held, strict=True))
    fp = sum(f and not r["toxic"] for f, r in zip(flags, held, strict=True))
    fn = sum(r["toxic"] and not f for f, r in zip(flags, held, strict=True))
    got = trained.meta["held_out_metrics"]["classifier"]
    assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn)
    assert got["precision"] == pytest.approx(tp / (tp + fp)) and got["recall"] == pytest.approx(tp / (tp + fn))
    assert got["precision"] > 0.6 and got["recall"] > 0.5  # well above chance (about half the statements are toxic)


def test_word_list_matches_whole_words():
    words = frozenset({"damn", "son of a bitch"})
    assert moderation.listed_words("Damn it, you SON of a bitch!", words) == ["damn", "son of a bitch"]
    assert moderation.listed_words("the damnation of Faust", words) == []
    assert "fuck" in moderation.word_list() and len(moderation.word_list()) > 800


def test_a_saved_moderator_loads_back_and_checks_its_embedder(trained, embedder, tmp_path):
    trained.save(tmp_path / "mod")
    loaded = moderation.load(tmp_path / "mod", embedder)
    texts = ["have a nice day", "you are a fucking idiot"]
    assert loaded.moderate(texts) == trained.moderate(texts)
    result = loaded.moderate(texts)[1]
    assert result["flagged"] and result["categories"]["harassment"] and result["profanity"] == ["fucking"]
    assert set(result["categories"]) == set(moderation.CATEGORIES)
    other = load_embedder("all-minilm-l6-v2")
    with torch.no_grad():
        next(iter(other.model.parameters()))[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="trained on the embeddings"):
        moderation.load(tmp_path / "mod", other)
    with pytest.raises(FormatError, match="no moderation.json"):
        moderation.load(tmp_path / "nowhere", embedder)
