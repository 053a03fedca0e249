"""Schemathesis fuzzes every route of the server's own OpenAPI schema (bodies that fit the schema
and bodies that do not): no answer is a 5xx, and the server is healthy and correct afterwards."""

import json
import urllib.request

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

import llmkit
from llmkit import ModelConfig, Transformer
from llmkit.serve.app import background, create_app
from llmkit.serve.config import ServeConfig
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=300, max_seq_len=64)).eval()
    tok = Tokenizer.train(["the cat sat on the mat. ", "a dog ran in the park! "] * 20, vocab_size=300)
    config = ServeConfig(model="tiny", max_tokens_limit=8, max_rows=16, max_request_bytes=100_000, compile=False)
    with background(create_app(model, tok, config)) as url:
        yield url, model, tok


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_gets_a_server_error(server, mode):
    schema = schemathesis.openapi.from_url(f"{server[0]}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # nothing to break in a request without parameters

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        call()


def test_still_healthy_and_correct_after_fuzzing(server):
    url, model, tok = server
    with urllib.request.urlopen(f"{url}/health") as r:
        assert r.status == 200
    body = json.dumps({"model": "tiny", "prompt": "the cat", "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        text = json.loads(r.read())["choices"][0]["text"]
    assert text == llmkit.generate(model, tok, "the cat", max_new_tokens=8, temperature=0).text
