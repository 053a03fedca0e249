"""`llmkit serve MODEL --rag INDEX` as a real process, through the `openai` client: a chat completion
answers from the passages the index retrieves for the last user message (the reply equals greedy
decoding of the grounded prompt built by hand), returns them as `sources` and its citations, in
streaming too; a conversation that does not end with a user turn is refused."""

from __future__ import annotations

import json

import openai
import pytest
from serve_helpers import llmkit_serve, save_tiny

import llmkit
from llmkit.generate.chat import end_of_turn_ids
from llmkit.rag import corpus, index
from llmkit.rag.ask import INSTRUCTION

QUESTION = "Who won Super Bowl 50?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    rows = root / "passages.jsonl"
    rows.write_text("".join(json.dumps(p) + "\n" for p in corpus.passages("squad")[:6] + corpus.passages("wikipedia")[:6]))
    built = index.build(corpus.passages(str(rows)))
    built.save(root / "index")
    save_tiny(root / "model", max_seq_len=2048)
    with llmkit_serve([str(root / "model"), "--rag", str(root / "index"), "--rag-k", "2",
                       "--served-model-name", "tiny"], root / "log.txt") as url:
        yield url, built, llmkit.load(root / "model")


def test_chat_returns_the_retrieved_sources_and_a_grounded_answer(setup):
    url, built, (model, tok) = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=12, temperature=0)
    hits = built.search(QUESTION, 2)
    sources = reply.model_extra["sources"]  # the extra field the openai client keeps
    assert [s["id"] for s in sources] == [h.passage["id"] for h in hits] and [s["n"] for s in sources] == [1, 2]
    assert sources[0]["text"] == hits[0].passage["text"]
    blocks = "\n\n".join(f"[{n}] {h.passage['title']}: {h.passage['text']}" for n, h in enumerate(hits, 1))
    prompt = tok.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{blocks}\n\nQuestion: {QUESTION}"}],
                             add_generation_prompt=True)
    expected = llmkit.generate(model, tok, tok.encode(prompt, add_special_tokens=False), max_new_tokens=12,
                               temperature=0.0, stop_token_ids=end_of_turn_ids(tok))
    assert reply.choices[0].message.content == expected.text
    assert isinstance(reply.choices[0].message.model_extra["citations"], list)

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[0].model_extra["sources"] == sources
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text

    with pytest.raises(openai.BadRequestError, match="last message must be the user's question"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Denver"}])
