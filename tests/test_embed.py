"""Sentence embeddings from the real all-MiniLM-L6-v2 (its PyPI package): llmkit's vectors equal
sentence-transformers' on 100 packaged sentences, `llmkit embed` prints them, and a real `llmkit serve`
of the encoder answers the `openai` client's `embeddings.create` (and refuses to generate)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from serve_helpers import post

import llmkit
from llmkit.data.labelled import movie_reviews
from llmkit.embeddings import load_embedder
from llmkit.errors import ConfigError
from llmkit.formats.named import resolve

NAME = "all-minilm-l6-v2"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """100 real sentences: the first Rotten Tomatoes reviews of the packaged movie-reviews corpus."""
    rows = movie_reviews("rotten_tomatoes")[:100]
    assert len(rows) == 100
    return [r.text for r in rows]


@pytest.fixture(scope="module")
def reference(sentences) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(resolve(NAME)), device="cpu")
    return st.encode(sentences, convert_to_tensor=True, batch_size=32).float()


def test_embeddings_equal_sentence_transformers(sentences, reference):
    ours = llmkit.embed(sentences)
    assert ours.shape == reference.shape == (100, 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    # The bar is 0.9999 each; the same fp32 math in another order differs by ~1e-7 (measured min 1 - 1e-7).
    assert cosine.min() >= 0.9999, cosine.min()
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(100))  # modules.json asks for Normalize


def test_the_bert_tokenizer_reads_without_its_fixed_padding(sentences):
    """MiniLM's tokenizer.json pads every text to 128 ids; llmkit's tokenizer encodes as transformers' does."""
    from transformers import AutoTokenizer

    from llmkit.tokenizer import Tokenizer

    ours = Tokenizer.from_pretrained(resolve(NAME))
    theirs = AutoTokenizer.from_pretrained(str(resolve(NAME)))
    for text in sentences[:5]:
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"]


def test_batching_and_padding_do_not_change_a_vector(sentences):
    embedder = load_embedder(NAME)
    alone = torch.cat([embedder([s]) for s in sentences[:6]])
    together = embedder(sentences[:6], batch_size=6)  # rows of different lengths, right-padded
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)  # fp32 noise of a padded matmul


def test_embed_refuses_a_decoder_and_a_non_list(tmp_path):
    from llmkit import ModelConfig, Transformer
    from llmkit.tokenizer import Tokenizer

    Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=300)).save_pretrained(tmp_path)
    Tokenizer.train(["a b c d e f"] * 10, vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="causal.*encoder"):
        load_embedder(tmp_path)
    with pytest.raises(ConfigError, match="list of strings"):
        load_embedder(NAME).encode("one string")


def test_cli_embed_prints_jsonl(sentences, reference, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sentences[:3]) + "\n")
    out = subprocess.run([sys.executable, "-m", "llmkit", "embed", "--input", str(texts)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == sentences[:3]
    got = torch.tensor([r["embedding"] for r in rows])
    assert torch.nn.functional.cosine_similarity(got, reference[:3]).min() >= 0.9999


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`llmkit serve --model all-minilm-l6-v2` as its own process."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", NAME, "--port", str(port)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"llmkit serve did not start: {proc.stdout.read()}") from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(20)


def test_openai_client_embeddings(server, sentences, reference):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    answer = client.embeddings.create(model=NAME, input=sentences[:5])  # the client asks for base64
    assert [d.index for d in answer.data] == list(range(5))
    got = torch.tensor([d.embedding for d in answer.data])
    assert torch.nn.functional.cosine_similarity(got, reference[:5]).min() >= 0.9999
    tokens = sum(len(ids) for ids in load_embedder(NAME).encode(sentences[:5]))
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == tokens
    floats = client.embeddings.create(model=NAME, input=sentences[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), got[0])


def test_an_encoder_server_refuses_to_generate(server):
    status, body, _ = post(f"{server}/v1/chat/completions",
                           {"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "encoder" in body["error"]["message"]
    status, body, _ = post(f"{server}/v1/completions", {"model": NAME, "prompt": "hi"})
    assert status == 400 and "cannot generate" in body["error"]["message"]
    status, body, _ = post(f"{server}/v1/embeddings", {"model": NAME, "input": []})
    assert status == 400 and body["error"]["param"] == "input"
