"""Supervised fine-tuning data: conversations -> token ids with a loss mask -> padded batches.

Example formats (one JSON object per line of a JSONL file, as in trl / Alpaca / ShareGPT-style sets):

- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}`
- `{"instruction": ..., "input": ..., "output": ..., "system": ...}` (Alpaca; input and system
  optional): one user turn (instruction, a blank line, input) and one assistant turn.
- `{"prompt": ..., "completion": ...}`: plain text without a chat template (trl's
  prompt-completion format); the completion is followed by EOS and only it is scored.

Conversations go through `Tokenizer.apply_chat_template`, whose assistant mask marks what the
model learns; every other token (system, user, template markup, padding) gets `IGNORE_INDEX` as
its label when `collate.collate_sft` pads examples into a batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.errors import DataError
from llmkit.files import read_jsonl_rows
from llmkit.tokenizer import Tokenizer

SFT_JSONL = "a JSONL file of SFT examples (messages, instruction/output or prompt/completion)"
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


def load_examples(path: str | Path, tokenizer: Tokenizer) -> list[Example]:
    return [row_to_example(row, tokenizer, where) for where, row in read_jsonl_rows(path, SFT_JSONL)]


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


# ---- length --------------------------------------------------------------------------------


def truncate(example: Example, max_len: int) -> Example:
    return Example(example.input_ids[:max_len], example.scored[:max_len])
