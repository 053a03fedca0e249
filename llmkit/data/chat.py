"""Supervised fine-tuning data: conversations -> token ids with a loss mask -> padded batches.

Example formats (one JSON object per line of a JSONL file, as in trl / Alpaca / ShareGPT-style sets):

- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`
- `{"instruction": ..., "input": ..., "output": ..., "system": ...}` (Alpaca; input and system
  optional): one user turn (instruction, a blank line, input) and one assistant turn.
- `{"prompt": ..., "completion": ...}`: plain text without a chat template (trl's
  prompt-completion format); the completion is followed by EOS and only it is scored.

Conversations go through `Tokenizer.apply_chat_template`, whose assistant mask marks what the
model learns; every other token (system, user, template markup, padding) gets `IGNORE_INDEX` as
its label. Batches are right-padded with an attention mask (no packing: a padded row costs some
compute but can never attend across documents). Labels are already shifted: `labels[:, t]` is the
target of position t, which is what `causal_lm_loss` expects.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.errors import DataError
from llmkit.files import read_jsonl_rows
from llmkit.tokenizer import Tokenizer

IGNORE_INDEX = -100  # cross_entropy's ignore_index, as in transformers / trl

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized example: ids and a 0/1 mask of the tokens the loss scores."""

    input_ids: list[int]
    scored: list[int]


# ---- parsing rows into conversations ---------------------------------------------------------


def row_to_example(row: dict, tokenizer: Tokenizer, where: str = "row") -> Example:
    """Tokenize one row of any supported format; errors name `where` (file:line)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" in row or "completion" in row:
        prompt, completion = _fields(row, ("prompt", "completion"), where)
        prompt_ids = tokenizer.encode(prompt)
        completion_ids = tokenizer.encode(completion) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        return Example(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids))
    return conversation_to_example(row_to_messages(row, where), tokenizer, where)


def row_to_messages(row: dict, where: str = "row") -> list[dict]:
    """The conversation of a `messages` or Alpaca row."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {i} is {m!r}; expected {{'role': one of {ROLES}, "
                                "'content': a string}")
        return messages
    if "instruction" in row or "output" in row:
        instruction, output = _fields(row, ("instruction", "output"), where)
        user = instruction + (f"\n\n{row['input']}" if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise DataError(f"{where}: a row with keys {sorted(row)}; expected 'messages', 'instruction'+'output' "
                    "or 'prompt'+'completion'")


def conversation_to_example(messages: Sequence[dict], tokenizer: Tokenizer, where: str = "conversation") -> Example:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be learned; "
                        "expected at least one message with role 'assistant'")
    ids, mask = tokenizer.apply_chat_template(messages)
    return Example(ids, mask)


def _fields(row: dict, names: tuple[str, ...], where: str) -> list[str]:
    missing = [n for n in names if not isinstance(row.get(n), str)]
    if missing:
        raise DataError(f"{where}: missing or non-string field(s) {missing}; expected strings for {list(names)}")
    return [row[n] for n in names]


def read_jsonl(path: str | Path) -> Iterable[tuple[str, dict]]:
    """(file:line, row) for each non-empty line of a JSONL file of SFT examples."""
    return read_jsonl_rows(path, "a JSONL file of SFT examples (messages, instruction/output or prompt/completion)")


def load_examples(path: str | Path, tokenizer: Tokenizer) -> list[Example]:
    return [row_to_example(row, tokenizer, where) for where, row in read_jsonl(path)]


# ---- packaged sources ------------------------------------------------------------------------


def chitchat_conversations(limit: int | None = None) -> list[list[dict]]:
    """Chitchat-dataset chats as user/assistant conversations (the first speaker is the user).

    Consecutive messages of one speaker are one turn; a chat that ends on a user turn loses it."""
    from llmkit.data import sources

    (path,) = sources.files("chitchat")
    chats = []
    for chat in json.loads(path.read_text(encoding="utf-8")).values():
        turns = [" ".join(m["text"].strip() for m in turn) for turn in chat["messages"]]
        messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        if len(messages) % 2:
            messages = messages[:-1]
        if messages:
            chats.append(messages)
        if limit is not None and len(chats) >= limit:
            break
    return chats


# ---- batching --------------------------------------------------------------------------------


def truncate(example: Example, max_len: int) -> Example:
    return Example(example.input_ids[:max_len], example.scored[:max_len])


def collate_sft(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and shifted `labels` (IGNORE_INDEX where unscored)."""
    width = max(len(e.input_ids) for e in examples) - 1
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids) - 1
        x = torch.tensor(e.input_ids)
        ids[i, :n], mask[i, :n] = x[:-1], 1
        labels[i, :n] = torch.where(torch.tensor(e.scored[1:]).bool(), x[1:], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_classification(items: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` + `attention_mask`, and one class id per row in `labels`."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (row, _) in enumerate(items):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in items])}


class BatchLoader:
    """Shuffled micro-batches over a list of items, epoch after epoch, resumable (the loop's `data`).

    The order of epoch e is a permutation seeded by (seed, e), so the position (epoch, index) is the
    whole state."""

    def __init__(self, items: Sequence, batch_size: int, collate: Callable[[Sequence], dict], seed: int = 0,
                 shuffle: bool = True):
        if not items:
            raise DataError("no examples to train on; expected at least one")
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        self.items, self.batch_size, self.collate = items, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self.items):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        picked = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return self.collate([self.items[i] for i in picked])

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """One pass in order (for evaluation)."""
        return [self.collate(self.items[i:i + self.batch_size]) for i in range(0, len(self.items), self.batch_size)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._permutation()
