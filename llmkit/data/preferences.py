"""Preference pairs: a prompt with a chosen and a rejected response, read, built and tokenized.

Two forms, as trl's preference data sets:
- text: `{"prompt": "...", "chosen": "...", "rejected": "..."}`; the response continues the prompt.
- chat: `{"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}`, rendered with
  the tokenizer's chat template; only the assistant tokens are scored.

Packaged sources: `hhh_alignment` (BIG-bench, 221 pairs: helpful, honest, harmless, other; for
evaluation), `movie_review_pairs` (a positive vs a negative review continuation of the same opening)
and `arithmetic_pairs` (a correct vs an incorrect answer to a generated sum).

Tokenized, a pair becomes two rows, `ids` and `labels` (IGNORE_INDEX on prompt tokens) for chosen
and for rejected; `pair_batches` serves them to the training loop through the one `BatchLoader`,
collated by `collate.collate_pairs` into one right-padded batch of 2B rows (the B chosen first),
optionally with cached reference log-probs.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.data import sources
from llmkit.data.batches import BatchLoader, in_order
from llmkit.data.collate import IGNORE_INDEX, collate_pairs
from llmkit.data.labelled import movie_reviews
from llmkit.data.split import hold_out
from llmkit.errors import DataError
from llmkit.files import atomic_write_text, read_jsonl_rows

HELD_OUT = 0.1  # share of the packaged reviews (by review) and of a JSONL file's pairs kept for testing


@dataclass
class PreferencePair:
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def check_pair(pair: PreferencePair, where: str) -> PreferencePair:
    """Raise DataError unless the pair is well formed: same form throughout, and chosen != rejected."""
    chat = pair.is_chat
    for name in ("chosen", "rejected"):
        value = getattr(pair, name)
        if isinstance(value, str) == chat:
            raise DataError(f"{where}: {name!r} is {type(value).__name__} but the prompt is "
                            f"{'a message list' if chat else 'text'}; expected the same form (text or chat) for "
                            "prompt, chosen and rejected")
        if chat and not (isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                          for m in value)):
            raise DataError(f"{where}: {name!r} must be a list of {{'role', 'content'}} messages")
        if not value:
            raise DataError(f"{where}: {name!r} is empty; expected a response")
    if chat and not all(isinstance(m, dict) and "role" in m and "content" in m for m in pair.prompt):
        raise DataError(f"{where}: 'prompt' must be text or a list of {{'role', 'content'}} messages")
    if pair.chosen == pair.rejected:
        raise DataError(f"{where}: chosen and rejected are identical ({_short(pair.chosen)}); expected two different "
                        "responses, the preferred one as 'chosen'")
    return pair


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def read_preference_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Pairs from a JSONL file of {"prompt", "chosen", "rejected"} objects (text or chat form)."""
    path = Path(path)
    pairs = []
    for where, row in read_jsonl_rows(path, "JSONL with one {prompt, chosen, rejected} object per line"):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{where}: missing {missing}; expected keys prompt, chosen, rejected")
        pairs.append(check_pair(PreferencePair(row["prompt"], row["chosen"], row["rejected"],
                                               row.get("source", path.name)), where))
    if not pairs:
        raise DataError(f"preference file {path} has no pairs")
    return pairs


def write_preference_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike) -> Path:
    lines = [json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "source": p.source})
             for p in pairs]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return Path(path)


# ---- packaged sources ------------------------------------------------------------------------


def hhh_alignment() -> list[PreferencePair]:
    """BIG-bench hhh_alignment (Askell et al. 2021): 221 dialogues, each with a better and a worse
    assistant reply (target score 1 vs 0). The prompt is the task's input with its "Human:/Assistant:"
    turns, and a reply is preceded by a space, as BIG-bench scores it."""
    pairs = []
    for path in sorted(p for p in sources.files("bigbench") if p.parent.parent.name == "hhh_alignment"):
        task = json.loads(path.read_text(encoding="utf-8"))
        for i, example in enumerate(task["examples"]):
            scores = example["target_scores"]
            best = max(scores, key=scores.get)
            worst = min(scores, key=scores.get)
            prompt = example["input"].rstrip()
            if not prompt.endswith("Assistant:"):
                prompt += "\n\nAssistant:"
            pairs.append(check_pair(PreferencePair(prompt, " " + best.strip(), " " + worst.strip(),
                                                   f"hhh_alignment/{path.parent.name}/{i}"), f"{path} example {i}"))
    return pairs


def held_out_pairs(pairs: Sequence[PreferencePair], split: str) -> list[PreferencePair]:
    """The "train" or "test" pairs of a file: HELD_OUT of them by a stable hash of their line index."""
    train, test = hold_out(range(len(pairs)), HELD_OUT, key=str)
    return [pairs[i] for i in (test if split == "test" else train)]


def movie_review_pairs(n: int, split: str = "train", prompt_words: int = 6, response_words: int = 24,
                       seed: int = 0) -> list[PreferencePair]:
    """`n` pairs (opening, positive continuation, negative continuation) from labelled movie reviews.

    A positive and a negative review are drawn; the opening (first `prompt_words` words) comes from
    one of them at random, and each response is the next `response_words` words (at least 8) of its own
    review.
    So half the chosen responses continue their opening and half are grafted onto the other's, and
    only sentiment separates chosen from rejected. `split` is "train" or "test" (10%, by review)."""
    if split not in ("train", "test"):
        raise DataError(f"split={split!r}; expected 'train' or 'test'")
    train, test = hold_out(movie_reviews(source=None), HELD_OUT, key=lambda r: r.key)
    reviews = [r for r in (test if split == "test" else train)
               if len(r.text.split()) >= prompt_words + min(response_words, 8)]
    pos = [r for r in reviews if r.label == 1]
    neg = [r for r in reviews if r.label == 0]
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    if n > min(len(pos), len(neg)):
        raise DataError(f"asked for {n} movie-review pairs from the {split} split; it has only "
                        f"{min(len(pos), len(neg))} reviews of each sentiment")
    pairs = []
    for p, q in zip(pos[:n], neg[:n], strict=True):
        p_words, n_words = p.text.split(), q.text.split()
        opening = p_words if rng.random() < 0.5 else n_words
        cut = slice(prompt_words, prompt_words + response_words)
        pairs.append(PreferencePair(" ".join(opening[:prompt_words]), " " + " ".join(p_words[cut]),
                                    " " + " ".join(n_words[cut]), f"movie_reviews/{p.key}+{q.key}"))
    return pairs


def review_openings(n: int, words: int = 6, split: str = "test", seed: int = 0) -> list[str]:
    """Openings of `n` reviews (PPO prompts), balanced between positive and negative reviews."""
    pairs = movie_review_pairs(n, split, prompt_words=words, response_words=1, seed=seed)
    return [p.prompt for p in pairs]


def arithmetic_pairs(n: int, seed: int = 0, max_operand: int = 99) -> list[PreferencePair]:
    """`n` pairs: "What is a + b?" with the correct sum as chosen and an off-by-a-few sum as rejected
    (a reasoning-gym-style graded problem whose answer is checked exactly)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        pairs.append(PreferencePair(f"Question: What is {a} + {b}?\nAnswer:", f" {a + b}", f" {wrong}",
                                    f"arithmetic/{seed}/{i}"))
    return pairs


# ---- tokenization and batches ----------------------------------------------------------------


def encode_response(tokenizer, prompt, response, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + response, labels IGNORE_INDEX on the prompt; text is tokenized in
    two parts (as trl does), chat through the template with its assistant mask. Over `max_len` the
    prompt is cut from the left, then the response from the right."""
    if isinstance(prompt, str):
        head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
        tail = tokenizer.encode(response)
        if tokenizer.eos_id is not None:
            tail.append(tokenizer.eos_id)
        ids, scored = head + tail, [0] * len(head) + [1] * len(tail)
    else:
        ids, scored = tokenizer.apply_chat_template(list(prompt) + list(response))
    if len(ids) > max_len:
        first = scored.index(1) if 1 in scored else len(ids)
        drop = min(len(ids) - max_len, max(first - 1, 0))
        ids, scored = ids[drop:][:max_len], scored[drop:][:max_len]
    labels = [t if s else IGNORE_INDEX for t, s in zip(ids, scored, strict=True)]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        raise DataError(f"a response is empty after tokenization or truncation to {max_len} tokens; "
                        "raise max_len or shorten the prompt")
    return ids, labels


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_len: int = 256) -> list[dict]:
    out = []
    for pair in pairs:
        c_ids, c_labels = encode_response(tokenizer, pair.prompt, pair.chosen, max_len)
        r_ids, r_labels = encode_response(tokenizer, pair.prompt, pair.rejected, max_len)
        out.append({"chosen": (c_ids, c_labels), "rejected": (r_ids, r_labels)})
    return out


def pair_batches(rows: list[dict], batch_size: int, pad_id: int, seed: int = 0) -> BatchLoader:
    """Shuffled batches of tokenized pairs for the loop (`next_batch`, resumable state)."""
    return BatchLoader(rows, batch_size, functools.partial(collate_pairs, pad_id=pad_id), seed=seed)


def fixed_batches(rows: list[dict], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches in order (every pair once)."""
    return in_order(rows, batch_size, functools.partial(collate_pairs, pad_id=pad_id))
