"""Grounded answers: the prompt holds the retrieved passages numbered [1].. in retrieval order, the
answer is what greedy decoding of that prompt gives, the citations map back to passages; and the
`llmkit rag index` / `llmkit rag ask` verbs put the gold passage of a SQuAD question first for SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import tiny_model

import llmkit
from llmkit.errors import ConfigError
from llmkit.generate.chat import end_of_turn_ids
from llmkit.rag import corpus, index
from llmkit.rag.ask import INSTRUCTION, ask, cited, last_user_text

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Which NFL team represented the AFC at Super Bowl 50?"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """The 6 SQuAD-style paragraphs of the suite's miniature BIG-bench (tests/data/bigbench; the first answers
    QUESTION, the next two are about the same game) and 8 Wikipedia leads as a JSONL corpus."""
    path = tmp_path_factory.mktemp("corpus") / "passages.jsonl"
    chosen = corpus.passages("squad") + corpus.passages("wikipedia")[:8]
    path.write_text("".join(json.dumps(p) + "\n" for p in chosen))
    return path


def test_the_prompt_numbers_the_retrieved_passages_and_the_answer_is_greedy(rows):
    passages = corpus.passages(str(rows))
    built = index.build(passages)
    model, tok = tiny_model(max_seq_len=2048)
    got = ask(model, tok, built, QUESTION, k=2, max_new_tokens=8)
    hits = built.search(QUESTION, 2)
    assert [p["id"] for p in got.retrieved] == [h.passage["id"] for h in hits]
    assert [p["n"] for p in got.retrieved] == [1, 2]
    blocks = "\n\n".join(f"[{n}] {h.passage['title']}: {h.passage['text']}" for n, h in enumerate(hits, 1))
    prompt = tok.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{blocks}\n\n"
                                                          f"Question: {QUESTION}"}], add_generation_prompt=True)
    expected = llmkit.generate(model, tok, tok.encode(prompt, add_special_tokens=False), max_new_tokens=8,
                               temperature=0.0, stop_token_ids=end_of_turn_ids(tok))
    assert got.text == expected.text.strip()


def test_citations_map_to_passages():
    shown = [{"n": n, "id": f"p{n}"} for n in (1, 2, 3)]
    assert [p["id"] for p in cited("It was X [2], and Y [1][2]; see [7].", shown)] == ["p2", "p1"]
    assert cited("no citation", shown) == []
    assert last_user_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": [{"type": "text", "text": "c"}]}]) == "c"
    with pytest.raises(ConfigError, match="needs a user message"):
        last_user_text([{"role": "system", "content": "s"}])


def run(*args) -> str:
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout


def test_cli_index_and_ask_answer_from_the_right_passage(rows, tmp_path):
    out = run("rag", "index", str(tmp_path / "idx"), "--corpus", str(rows))
    assert f"indexed {len(corpus.passages(str(rows)))} passages" in out and (tmp_path / "idx/manifest.json").is_file()
    answer = json.loads(run("rag", "ask", "smollm2-135m-instruct", QUESTION, "--index", str(tmp_path / "idx"),
                            "--k", "1", "-n", "8", "--json"))
    assert answer["retrieved"][0]["id"] == "squad:0.0" and answer["retrieved"][0]["n"] == 1
    # whether a 135M model answers right is the benchmark's question (benchmarks/rag_squad.py), not this test's
    assert answer["text"] and {p["id"] for p in answer["cited"]} <= {p["id"] for p in answer["retrieved"]}
    bad = subprocess.run([sys.executable, "-m", "llmkit", "rag", "ask", "smollm2-135m-instruct", "q", "--index",
                          str(tmp_path / "none")], capture_output=True, text=True, env={**os.environ,
                          "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 1 and "no manifest.json" in bad.stderr and "Traceback" not in bad.stderr
