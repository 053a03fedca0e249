"""Grounded answers: retrieve passages, number them in the chat prompt, answer, and return what was cited.

The passages go into the user turn as `[1] Title: text`, so any chat template carries them; the
model is asked to cite by number, and the numbers it writes are mapped back to passages. An answer
that cites nothing still returns what it was shown (`retrieved`), so a reader can check it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmkit.errors import ConfigError
from llmkit.generate.api import generate
from llmkit.generate.chat import end_of_turn_ids
from llmkit.rag.index import Hit, Index

INSTRUCTION = ("Answer the question using only the numbered passages below. Cite the passages you use "
               "like [1]. If the passages do not contain the answer, say that you do not know.")
CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    text: str
    cited: list[dict]  # the passages the answer cites ({"n", "id", "title", "text"}), in citation order
    retrieved: list[dict]  # every passage in the prompt, numbered from 1


def numbered(hits: list[Hit]) -> list[dict]:
    return [{"n": n, **h.passage} for n, h in enumerate(hits, 1)]


def grounded_messages(question: str, passages: list[dict], messages: list[dict] | None = None,
                      instruction: str = INSTRUCTION) -> list[dict]:
    """The chat with the numbered passages and the question as its last user turn (earlier turns kept)."""
    context = "\n\n".join(f"[{p['n']}] {p['title']}: {p['text']}" if p.get("title") else f"[{p['n']}] {p['text']}"
                          for p in passages)
    turn = {"role": "user", "content": f"{instruction}\n\n{context}\n\nQuestion: {question}"}
    return [*(messages or []), turn]


def cited(text: str, passages: list[dict]) -> list[dict]:
    """The passages `text` cites by [n], each once, in order of first citation; numbers out of range are ignored."""
    out, seen = [], set()
    for m in CITATION.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= len(passages) and n not in seen:
            seen.add(n)
            out.append(passages[n - 1])
    return out


def last_user_text(messages: list[dict]) -> str:
    """The question: the text of the last user message (what the server retrieves for)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            return " ".join(part.get("text", "") for part in content or [] if isinstance(part, dict))
    raise ConfigError("a grounded answer needs a user message to retrieve for; the messages have none")


def ask(model, tokenizer, index: Index, question: str, k: int = 3, mode: str = "hybrid",
        max_new_tokens: int = 128, instruction: str = INSTRUCTION, **sampling) -> Answer:
    """Answer `question` from the k passages `index` retrieves for it (greedy unless sampling says otherwise)."""
    if not question.strip():
        raise ConfigError("the question is empty")
    passages = numbered(index.search(question, k, mode))
    text = tokenizer.render_chat(grounded_messages(question, passages, instruction=instruction),
                                 add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    sampling = {"temperature": 0.0, "stop_token_ids": end_of_turn_ids(tokenizer), **sampling}
    out = generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, **sampling)
    return Answer(out.text.strip(), cited(out.text, passages), passages)
