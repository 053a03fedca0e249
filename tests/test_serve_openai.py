"""The server through the real `openai` client against uvicorn on 127.0.0.1: completions, chat,
streaming, logprobs, n, stop and seeds give exactly what `llmkit.generate` gives with the same
settings; 32 concurrent streams each equal their sequential run; a client that disconnects frees
its rows; errors have OpenAI's shape and never take the server down."""

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from serve_helpers import get, llmkit_serve, metrics, post, save_tiny

import llmkit
from llmkit import ModelConfig, Transformer
from llmkit.generate.chat import end_of_turn_ids
from llmkit.serve.app import background, create_app
from llmkit.serve.config import ServeConfig
from llmkit.serve.schema import token_string

NAME = "tiny"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as an HF folder with its tokenizer (chatml template), loaded like `llmkit serve`."""
    return save_tiny(tmp_path_factory.mktemp("tiny"), max_seq_len=96)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return llmkit.load(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    with background(create_app(model, tok, ServeConfig(model=NAME, max_tokens_limit=200, compile=False))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


# ---- completions ---------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


@pytest.mark.parametrize("sampling", [
    dict(temperature=0),
    dict(temperature=0.8, top_p=0.9, seed=5, n=2),
    dict(temperature=1.1, top_k=20, min_p=0.05, seed=9, frequency_penalty=0.4, presence_penalty=0.2,
         repetition_penalty=1.2, logit_bias={"17": 3.0}),
], ids=["greedy", "seeded-n2", "all-processors"])
def test_completion_equals_llmkit_generate(client, tiny, sampling):
    model, tok = tiny
    extra = {k: sampling[k] for k in ("top_k", "min_p", "repetition_penalty") if k in sampling}
    api = {k: v for k, v in sampling.items() if k not in extra}
    got = client.completions.create(model=NAME, prompt="the cat sat", max_tokens=24, logprobs=3, stop=[" park"],
                                    extra_body=extra, **api)
    want = llmkit.generate(model, tok, "the cat sat", max_new_tokens=24, logprobs=3, stop=[" park"],
                           **{**sampling, "logit_bias": {17: 3.0}} if "logit_bias" in sampling else sampling)
    want = want if isinstance(want, list) else [want]
    assert len(got.choices) == len(want)
    for choice, w in zip(got.choices, want, strict=True):
        assert choice.text == w.text and choice.finish_reason == w.finish_reason
        assert choice.logprobs.token_logprobs == pytest.approx(w.logprobs, abs=1e-6)
        assert choice.logprobs.tokens == [token_string(tok, i) for i in w.token_ids]
        assert [v for t in choice.logprobs.top_logprobs for v in t.values()] == pytest.approx(
            [v for t in w.top_logprobs for v in t.values()], abs=1e-6)
    assert got.usage.prompt_tokens == len(want[0].prompt_token_ids)
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)


def test_stop_string_cuts_the_text(client, tiny):
    model, tok = tiny
    free = llmkit.generate(model, tok, "a dog", max_new_tokens=30, temperature=0, ignore_eos=True)
    stop = free.text[5:8]
    got = client.completions.create(model=NAME, prompt="a dog", max_tokens=30, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and got.choices[0].text == free.text[:free.text.index(stop)]


def test_prompt_lists_and_token_ids(client, tiny):
    model, tok = tiny
    ids = tok.encode("héllo wörld", add_special_tokens=True)
    got = client.completions.create(model=NAME, prompt=["the cat", "a dog"], max_tokens=8, temperature=0)
    want = llmkit.generate(model, tok, ["the cat", "a dog"], max_new_tokens=8, temperature=0)
    assert [c.text for c in got.choices] == [w.text for w in want] and [c.index for c in got.choices] == [0, 1]
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == llmkit.generate(model, tok, ids, max_new_tokens=8, temperature=0).text
    batch = client.completions.create(model=NAME, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert len(batch.choices) == 2


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_returns_prompt_logprobs_in_the_legacy_schema(server, tiny, max_tokens):
    """What lm-eval's loglikelihood sends: token ids, echo, logprobs=1, max_tokens 1 (older: 0)."""
    model, tok = tiny
    ids = tok.encode("the cat sat on the mat", add_special_tokens=True)
    status, body, _ = post(f"{server}/v1/completions", {"model": NAME, "prompt": ids, "echo": True, "logprobs": 1,
                                                        "max_tokens": max_tokens, "temperature": 0})
    assert status == 200
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-5)
    text = body["choices"][0]["text"]
    assert text.startswith(tok.decode(ids))
    assert [text[o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"], strict=True)][:len(ids)] == \
        lp["tokens"][:len(ids)]
    # lm-eval's is_greedy compares each token's logprob with the top one exactly
    for i, (chosen, top) in enumerate(zip(lp["token_logprobs"][1:len(ids)], lp["top_logprobs"][1:len(ids)],
                                          strict=True)):
        assert (chosen == max(top.values())) == (int(ref[i].argmax()) == ids[i + 1])


def test_streaming_completion_joins_to_the_full_text_with_usage_last(client, tiny):
    model, tok = tiny
    want = llmkit.generate(model, tok, "the mat", max_new_tokens=20, temperature=0.7, seed=1, n=2)
    chunks = list(client.completions.create(model=NAME, prompt="the mat", max_tokens=20, temperature=0.7, seed=1,
                                            n=2, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.text
        assert c.usage is None
    assert [texts[0], texts[1]] == [w.text for w in want]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(len(w.token_ids) for w in want)


# ---- chat ----------------------------------------------------------------------------------------


def chat_reference(model, tok, messages, **sampling):
    ids, _ = tok.apply_chat_template(messages, add_generation_prompt=True)
    return llmkit.generate(model, tok, ids, stop_token_ids=end_of_turn_ids(tok), **sampling)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]


def test_chat_and_streamed_chat_equal_llmkit_generate(client, tiny):
    model, tok = tiny
    want = chat_reference(model, tok, MESSAGES, max_new_tokens=20, temperature=0.9, seed=4, logprobs=2)
    got = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0.9, seed=4,
                                         logprobs=True, top_logprobs=2)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert [c.logprob for c in choice.logprobs.content] == pytest.approx(want.logprobs, abs=1e-6)
    assert [t.logprob for c in choice.logprobs.content for t in c.top_logprobs] == pytest.approx(
        [v for t in want.top_logprobs for v in t.values()], abs=1e-6)
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0.9, seed=4,
                                            stream=True)
    pieces = [c.choices[0].delta for c in stream]
    assert pieces[0].role == "assistant"
    assert "".join(d.content or "" for d in pieces) == want.text


def test_a_later_chat_turn_reuses_the_cached_prefix(server, client, tiny):
    """The second turn of a conversation starts with the first turn's prompt: its full 16-token blocks
    come from the prefix cache (counted in /metrics), and the answer is still llmkit.generate's."""
    model, tok = tiny
    turn1 = [{"role": "system", "content": "héllo wörld, naïve café. the cat sat on the mat."},
             {"role": "user", "content": "a dog ran"}]
    first = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=8, temperature=0)
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "in the park"}]
    before = metrics(server)
    second = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=8, temperature=0)
    after = metrics(server)
    hits = after[("llmkit:prefix_cache_hits_total", ())] - before[("llmkit:prefix_cache_hits_total", ())]
    assert hits >= 16 and hits % 16 == 0
    assert second.choices[0].message.content == chat_reference(model, tok, turn2, max_new_tokens=8, temperature=0).text


@pytest.mark.slow
def test_smollm2_served_as_the_cli_serves_it_equals_llmkit_generate():
    """`llmkit serve smollm2-135m-instruct` loads the Q4_1 file as int4 packed linears (its own bits) and
    decodes through the compiled step; the served reply, streamed and not, equals `llmkit.generate` on
    the same quantized model token for token, logprobs within 1e-4 (the compiled step against the same
    step compiled in the library: the same kernels; 1e-4 leaves room for a thread-count-dependent
    reduction order)."""
    from llmkit.generate.chat import load
    from llmkit.quant.linear import PackedLinear

    model, tok = load("smollm2-135m-instruct", "auto")
    assert {m.bits for m in model.modules() if isinstance(m, PackedLinear)} == {4, 8}  # blocks 4, head 8
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # one row at most: only the one-row graph is compiled (each graph costs ~1 min on a cold cache)
    with background(create_app(model, tok, ServeConfig(model="smollm2", max_rows=1))) as url:
        want = chat_reference(model, tok, messages, max_new_tokens=12, temperature=0, logprobs=0, compile=True)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                              logprobs=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert got.choices[0].message.content == want.text == streamed
    served = [t.logprob for t in got.choices[0].logprobs.content]
    assert served == pytest.approx(want.logprobs[:len(served)], abs=1e-4)
    assert "Paris" in want.text


# ---- concurrency and disconnects -----------------------------------------------------------------

PROMPTS = ["the cat", "a dog ran", "héllo", "the mat. a", "café naïve", "sat on the", "park! a", "wörld"]


def test_32_concurrent_streams_each_equal_their_sequential_run(server, tiny):
    model, tok = tiny
    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + i % 13) for i in range(32)]
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

    async def one(prompt, n_tokens):
        text = ""
        async for chunk in await client.completions.create(model=NAME, prompt=prompt, max_tokens=n_tokens,
                                                           temperature=0, stream=True):
            text += chunk.choices[0].text
        return text

    async def all_of_them():
        return await asyncio.gather(*(one(p, n) for p, n in jobs))

    before = metrics(server)
    texts = asyncio.run(all_of_them())
    assert len(texts) == 32
    for (prompt, n_tokens), text in zip(jobs, texts, strict=True):
        assert text == llmkit.generate(model, tok, prompt, max_new_tokens=n_tokens, temperature=0).text
    after = metrics(server)
    ttft = ("llmkit:time_to_first_token_seconds_count", ())
    assert after[ttft] - before[ttft] == 32
    assert after[("llmkit:num_requests_running", ())] == 0


def test_a_client_that_disconnects_frees_its_rows(tiny):
    """A long request (4,000 tokens of a 4,096-token context), dropped after 3 tokens: the server
    aborts it at its next step instead of generating the rest."""
    _, tok = tiny
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=300, max_seq_len=4096)).eval()
    with background(create_app(model, tok, ServeConfig(model=NAME, max_tokens_limit=4000, compile=False))) as server:
        client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        abort = ("llmkit:request_success_total", (("finished_reason", "abort"),))
        running = ("llmkit:num_requests_running", ())
        stream = client.completions.create(model=NAME, prompt="the cat", max_tokens=4000, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 2:
                break
        assert metrics(server)[running] == 1
        stream.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            now = metrics(server)
            if now[running] == 0 and now[abort] == 1:
                break
            time.sleep(0.05)
        assert now[running] == 0 and now[abort] == 1
        assert now[("llmkit:generation_tokens_total", ())] < 4000


# ---- tokenizer routes, health, metrics --------------------------------------------------------------


def test_tokenizer_routes(server, tiny):
    _, tok = tiny
    status, body, _ = post(f"{server}/tokenize", {"prompt": "the cat", "add_special_tokens": False})
    assert status == 200 and body["tokens"] == tok.encode("the cat") and body["count"] == len(body["tokens"])
    status, body, _ = post(f"{server}/detokenize", {"tokens": tok.encode("naïve café")})
    assert body["prompt"] == "naïve café"
    info = json.loads(get(f"{server}/tokenizer_info")[1])
    assert info["eos_token"] == tok.id_to_token(tok.eos_id) and "im_start" in info["chat_template"]
    assert get(f"{server}/health")[0] == 200


# ---- errors ----------------------------------------------------------------------------------------


def test_errors_have_openai_shape_and_the_server_survives(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature" and set(e.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=[5] * 500)
    assert "96" in e.value.body["message"] and "500" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="hi", max_tokens=201)
    assert e.value.body["param"] == "max_tokens"
    cases = [({"model": NAME}, "prompt"), ({"model": NAME, "prompt": "x", "n": "two"}, "n"),
             ({"model": NAME, "prompt": [10 ** 6]}, "prompt"), ({"model": NAME, "prompt": "x", "seed": 2 ** 70}, "seed"),
             ({"model": NAME, "prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
             ({"model": NAME, "prompt": "x", "top_p": 0}, "top_p")]
    for body, param in cases:
        status, out, _ = post(f"{server}/v1/completions", body)
        assert status == 400 and out["error"]["param"] == param, (body, out)
    status, out, _ = post(f"{server}/v1/completions", b"{not json")
    assert status == 400 and out["error"]["type"] == "invalid_request_error"
    status, out, _ = post(f"{server}/v1/completions", {"model": NAME, "prompt": "x" * 5_000_000})
    assert status == 413
    status, out, _ = post(f"{server}/v1/nothing", {})
    assert status == 404 and "error" in out
    assert get(f"{server}/health")[0] == 200
    assert client.completions.create(model=NAME, prompt="the", max_tokens=2).choices


def test_api_key_and_a_full_queue(tiny):
    model, tok = tiny
    config = ServeConfig(model=NAME, api_key="secret", max_waiting=0, compile=False)
    with background(create_app(model, tok, config)) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.body["code"] == "invalid_api_key"
        assert get(f"{url}/health")[0] == 200 and get(f"{url}/")[0] == 200  # open without a key
        for path in ("/metrics", "/docs", "/openapi.json", "/tokenizer_info"):  # everything else needs it
            with pytest.raises(urllib.error.HTTPError) as e:
                get(f"{url}{path}")
            assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
            assert get(f"{url}{path}", {"Authorization": "Bearer secret"})[0] == 200
        status, out, headers = post(f"{url}/v1/completions", {"model": NAME, "prompt": "x"},
                                    {"Authorization": "Bearer secret"})
        assert status == 429 and headers["retry-after"] == "1" and out["error"]["code"] == "rate_limit_exceeded"


def test_cli_serves_a_folder_on_localhost_within_max_model_len(tiny_dir, tmp_path):
    log = tmp_path / "serve.log"
    with llmkit_serve([str(tiny_dir), "--served-model-name", "cli-tiny", "--max-model-len", "40"], log) as url:
        status, body = get(f"{url}/v1/models")
        assert status == 200 and json.loads(body)["data"][0] == {
            "id": "cli-tiny", "object": "model", "created": json.loads(body)["data"][0]["created"],
            "owned_by": "llmkit", "max_model_len": 40}  # the cap, not the model's 96
        status, out, _ = post(f"{url}/v1/completions", {"model": "cli-tiny", "prompt": list(range(3, 53)),
                                                        "max_tokens": 1})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded" and "40 tokens" in out["error"]["message"]
        status, out, _ = post(f"{url}/v1/completions", {"model": "cli-tiny", "prompt": list(range(3, 33)),
                                                        "max_tokens": 100, "ignore_eos": True, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] == 10  # 30 + 10 fill the capped context
    lines = log.read_text().splitlines()  # a line per phase, the address, then one per finished request
    # the load phase, the compile phase (the decode step compiled before it listens), then the address
    assert [line.split(" ")[0] for line in lines[:4]] == ["load", "load", "compile", "compile"], lines
    assert "http://127.0.0.1:" in lines[4], lines
    assert any(re.search(r"request [0-9a-f]+: length, prompt 30 tokens, generated 10 in 1 row\(s\), first token "
                         r"\d+ ms, total \d+ ms", line) for line in lines), lines
