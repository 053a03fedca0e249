"""`llmkit serve MODEL --rag INDEX --moderation FOLDER` as a real process, through the `openai` client:
a chat completion answers from the passages the index retrieves for the last user message (the reply
equals greedy decoding of the grounded prompt built by hand), returns them as `sources` and its
citations, in streaming too; a conversation that does not end with a user turn is refused;
`moderations.create` answers with the moderator's verdicts, and a flagged generation comes back
whole with its flag."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from serve_helpers import llmkit_serve, save_tiny

import llmkit
from llmkit import moderation
from llmkit.embeddings import fingerprint
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
    # A head that calls everything hateful (bias +10): every generation is flagged, so the filter's report shows
    # (the classifier's quality is tests/test_moderation.py's)
    meta = {"format": moderation.FORMAT, "embedder": "all-minilm-l6-v2", **fingerprint(built.embedder),
            "threshold": 0.5}
    moderator = moderation.Moderator(built.embedder, torch.zeros(built.embedder.dim), torch.tensor(10.0), 0.5,
                                     moderation.word_list(), meta)
    moderator.save(root / "moderation")
    with llmkit_serve([str(root / "model"), "--compile", "false", "--rag", str(root / "index"), "--rag-k", "2", "--moderation",
                       str(root / "moderation"), "--served-model-name", "tiny"], root / "log.txt") as url:
        yield url, built, llmkit.load(root / "model"), moderator


def test_chat_returns_the_retrieved_sources_and_a_grounded_answer(setup):
    url, built, (model, tok), _ = setup
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
    assert reply.choices[0].model_extra["moderation"] == {"flagged": True, "categories": ["hate"]}  # reported, kept

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                                 max_tokens=12, temperature=0, stream=True))
    assert chunks[0].model_extra["sources"] == sources
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].choices[0]
    assert last.model_extra["moderation"]["flagged"] is True

    with pytest.raises(openai.BadRequestError, match="last message must be the user's question"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[
            {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Denver"}])


def test_moderations_answer_the_openai_client(setup):
    url, _, _, moderator = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    texts = ["have a nice day", "you are a fucking idiot"]
    got = client.moderations.create(input=texts)
    assert got.id.startswith("modr-") and len(got.results) == 2
    expected = moderator.moderate(texts)
    for result, want in zip(got.results, expected, strict=True):
        assert result.flagged == want["flagged"]
        assert result.categories.hate == want["categories"]["hate"]
        assert result.categories.harassment == want["categories"]["harassment"]
        assert result.category_scores.hate == pytest.approx(want["category_scores"]["hate"], abs=1e-6)
    assert not got.results[0].categories.harassment and got.results[1].categories.harassment
    assert got.results[1].model_extra["profanity"] == ["fucking"]
    with pytest.raises(openai.BadRequestError, match="input is empty"):
        client.moderations.create(input=[])


def test_completions_report_the_verdict_streaming_or_not(setup):
    url, _, _, _ = setup
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0)
    assert whole.choices[0].model_extra["moderation"] == {"flagged": True, "categories": ["hate"]}
    assert whole.choices[0].text  # flagged, and still there
    chunks = list(client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].model_extra.get("moderation") for c in chunks][-1] == {"flagged": True, "categories": ["hate"]}
    assert all("moderation" not in c.choices[0].model_extra for c in chunks[:-1])
