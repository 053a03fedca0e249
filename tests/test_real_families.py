"""The real Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M GGUFs in llmkit against llama.cpp
(llama-cpp-python) on the same files: logits on 2,000 tokens of packaged text, perplexity, and
greedy chat continuations.

llama.cpp quantizes activations to 8 bits inside its quantized matmuls (Q4_K/Q5_0/Q6_K/Q8_0 here)
while llmkit dequantizes the weights to fp32 and computes in fp32, so logits are compared by
agreement (top-1, KL, perplexity), as for SmolLM2 in test_gguf_llamacpp.py.
"""

import functools
import gc

import numpy as np
import pytest
import torch
from gguf_helpers import needs_llamacpp

import llmkit
from llmkit.config import ModelConfig
from llmkit.formats.gguf import config_from_metadata, read_metadata
from llmkit.formats.llamacpp import LlamaCpp, agreement, margin, perplexity
from llmkit.formats.named import resolve

pytestmark = [needs_llamacpp, pytest.mark.slow]

MODELS = ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
N_TOKENS = 2000


PRESETS = {"qwen2.5-coder-0.5b-instruct": "qwen2.5-0.5b", "gemma-3-270m": "gemma-3-270m"}


@pytest.mark.parametrize("name", MODELS)
def test_the_family_preset_is_the_real_checkpoints_config(name):
    path = resolve(name)
    real = config_from_metadata(read_metadata(path), {"token_embd.weight"}, str(path)).to_dict()
    preset = ModelConfig.from_preset(PRESETS[name]).to_dict()
    assert {**real, "name": None} == {**preset, "name": None}


@pytest.fixture(scope="module", autouse=True)
def _release_the_models():
    """Both real models (fp32, with their llama.cpp references) are cached for this module only: the whole
    suite must fit a 24 GiB machine."""
    yield
    for cached in (loaded, reference, wikipedia_ids, library_reply):
        cached.cache_clear()
    gc.collect()


@functools.cache
def loaded(name):
    return llmkit.load(name)


@functools.cache
def reference(name):
    return LlamaCpp(resolve(name), n_ctx=N_TOKENS + 64)


@functools.cache
def wikipedia_ids(name, n=N_TOKENS):
    """The first `n` tokens of the packaged Wikipedia leads, joined by blank lines, BOS first where the
    model adds one."""
    from llmkit.data.corpora import documents

    _, tok = loaded(name)
    text = ""
    for doc in documents("wikipedia"):
        text += doc.text + "\n\n"
        if len(text) > 8 * n:
            break
    ids = tok.encode(text, add_special_tokens=True)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_perplexity_agree_with_llama_cpp(name):
    model, _ = loaded(name)
    ids = wikipedia_ids(name)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = reference(name).logits(ids)
    stats = agreement(ours, theirs)
    ppl_ours, ppl_theirs = perplexity(ours, ids), perplexity(theirs, ids)
    print(f"\n{name} vs llama.cpp on {len(ids)} Wikipedia tokens: {stats}; "
          f"perplexity llmkit {ppl_ours:.4f}, llama.cpp {ppl_theirs:.4f}")
    assert stats["top1"] >= 0.93, stats
    assert stats["mean_kl"] <= 0.01, stats
    assert abs(ppl_ours / ppl_theirs - 1) < 0.01, (ppl_ours, ppl_theirs)
    assert 1.5 < ppl_theirs < 100  # a working model on English prose, not noise


CHATS = ["What is the capital of France?", "Write a Python function that reverses a string."]


@pytest.mark.parametrize("prompt", CHATS)
@pytest.mark.parametrize("name", MODELS)
def test_greedy_chat_continuation_equals_llama_cpp_until_a_near_tie(name, prompt):
    """64 greedy tokens after the model's own chat template; a difference is accepted only where both
    models' top two logits are within 0.5 of each other (a near-tie that 8-bit activations can flip)."""
    model, tok = loaded(name)
    ref = reference(name)
    if tok.chat_template is None:  # the base Gemma-3 GGUF ships none: google/gemma-3-*-it's template
        tok.chat_template = "gemma"
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    theirs = ref.greedy(list(ids), 64, stop_ids=(tok.eos_id,))
    ours = llmkit.generate(model, tok, list(ids), max_new_tokens=64, temperature=0.0).token_ids
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    print(f"\n{name} {prompt!r}: ours {tok.decode(ours)!r}\n  llama.cpp {tok.decode(theirs)!r}")
    if k is None:
        assert ours == theirs
        return
    prefix = list(ids) + ours[:k]
    with torch.no_grad():
        our_margin = margin(model(torch.tensor([prefix]))[0, -1].numpy())
    their_margin = margin(np.asarray(ref.logits(prefix)[-1]))
    print(f"  first difference at token {k}: margins llmkit {our_margin:.3f}, llama.cpp {their_margin:.3f}")
    assert k >= 1 and our_margin < 0.5 and their_margin < 0.5, (k, our_margin, their_margin)


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_transformers_own_gguf_loader(name):
    """transformers reads the same GGUF (`gguf_file=`, the gguf package's dequantizers as ours) into
    its own Qwen2/Gemma3 classes: fp32 logits agree to 1e-5 (the same math up to matmul blocking;
    measured 0.0 on this machine)."""
    import transformers

    path = resolve(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    model, _ = loaded(name)
    ids = torch.tensor([wikipedia_ids(name)[:256]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), theirs(ids).logits, atol=1e-5, rtol=0)


# ---- every verb on the real checkpoints ----------------------------------------------------------
# `llmkit chat`, `serve`, `eval` and `finetune` on the registry names, as a user types them. The base
# Gemma-3 GGUF ships no chat template, so chat and serve take `--chat-template gemma` (vLLM's and
# llama.cpp's flag); Qwen2.5-Coder-Instruct brings its own.

QUESTION = "What is the capital of France?"
TEMPLATE_FLAG = {"qwen2.5-coder-0.5b-instruct": [], "gemma-3-270m": ["--chat-template", "gemma"]}


@functools.cache
def library_reply(name, max_new_tokens=24):
    """`llmkit.generate`'s greedy reply to QUESTION under the model's template (Gemma's for the base
    Gemma-3), up to the end of the turn. The library's greedy chat continuations are checked against
    llama.cpp above; the verbs must give exactly these."""
    from llmkit.generate.chat import end_of_turn_ids

    model, tok = loaded(name)
    saved, tok.chat_template = tok.chat_template, tok.chat_template or "gemma"
    try:
        ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)[0]
    finally:
        tok.chat_template = saved
    return llmkit.generate(model, tok, list(ids), max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_token_ids=end_of_turn_ids(tok)).text


@pytest.mark.parametrize("name", MODELS)
def test_chat_verb_replies_as_the_library_does(name, monkeypatch, capsys):
    import io

    from llmkit.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/exit\n"))
    # --quantize none: the library's reply is on the file's weights dequantized, checked against llama.cpp
    # above; the verbs' default, the file's own bits, is checked on SmolLM2 (test_serve_openai)
    assert main(["chat", name, "--temperature", "0", "--max-new-tokens", "24", "--quantize", "none",
                 *TEMPLATE_FLAG[name]]) == 0
    said = capsys.readouterr().out
    want = library_reply(name)
    print(f"\n{name}: llmkit chat said {said!r}")
    assert f"> {want}\n" in said
    if name == "qwen2.5-coder-0.5b-instruct":  # an instruct model answers; the base Gemma-3 rambles
        assert "Paris" in want


def test_chat_verb_without_a_template_names_the_flag(capsys):
    from llmkit.cli import main

    assert main(["chat", "gemma-3-270m"]) == 1
    err = capsys.readouterr().err
    assert "no chat template" in err and "--chat-template" in err


@pytest.mark.parametrize("name", MODELS)
def test_serve_verb_answers_the_openai_client_as_the_library_does(name, tmp_path):
    import socket
    import subprocess
    import sys
    import time

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", name, "--port", str(port), "--threads", "2",
                               "--quantize", "none", "--compile", "false",
                               *TEMPLATE_FLAG[name]], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.time() + 180
        while True:
            try:
                assert [m.id for m in client.models.list()] == [name]
                break
            except openai.APIConnectionError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.time() < deadline, "the server did not answer within 180 s"
                time.sleep(1)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=24, temperature=0)
        assert chat.choices[0].message.content == library_reply(name)
        prompt = "The capital of France is the city of"
        completion = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
        model, tok = loaded(name)
        want = llmkit.generate(model, tok, prompt, max_new_tokens=4, temperature=0.0).text
        assert completion.choices[0].text == want and "Paris" in want
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("name", MODELS)
def test_eval_verb_scores_choices_as_the_model_and_llama_cpp_do(name, tmp_path, capsys):
    """`llmkit eval` on the 12 easy questions of tests/data/eval/mc.yaml. Each choice's loglikelihood,
    recomputed here with lm-eval's split (the continuation is what follows the context's tokens), equals
    one plain forward of the model (1e-3: batching and padding change the matmul blocking only) and
    is close to llama.cpp's on the same tokens; the same answer is picked in every question and most are
    right. llama.cpp quantizes activations to 8 bits, which moves a single-token logprob on these short
    prompts by up to 0.21 nats on Qwen2.5 and 0.60 on Gemma-3 (means 0.07 and 0.25; measured), hence max 1.0 and
    mean 0.35."""
    import json
    from pathlib import Path

    from llmkit.cli import main
    from llmkit.formats.llamacpp import log_softmax

    mc = Path(__file__).parent / "data/eval/mc.yaml"
    assert main(["eval", name, "--tasks", str(mc), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "results.json").read_text())["results"]["llmkit_local_mc"]
    rows = [json.loads(line) for line in (tmp_path / "samples/llmkit_local_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    model, tok = loaded(name)
    gaps = []
    for row in rows:
        context = tok.encode(row["prompt"], add_special_tokens=True)
        direct, theirs = [], []
        for choice in row["choices"]:
            whole = tok.encode(row["prompt"] + " " + choice, add_special_tokens=True)
            assert whole[:len(context)] == context
            with torch.no_grad():
                ours = torch.log_softmax(model(torch.tensor([whole]))[0].double(), -1).numpy()
            ref = log_softmax(np.asarray(reference(name).logits(whole), dtype=np.float64))
            continuation = range(len(context), len(whole))
            direct.append(float(sum(ours[i - 1, whole[i]] for i in continuation)))
            theirs.append(float(sum(ref[i - 1, whole[i]] for i in continuation)))
        np.testing.assert_allclose(row["loglikelihoods"], direct, atol=1e-3, rtol=0)
        assert int(np.argmax(direct)) == int(np.argmax(theirs)), (row["prompt"], direct, theirs)
        gaps += [abs(a - b) for a, b in zip(direct, theirs, strict=True)]
    print(f"\n{name}: acc {result['acc']:.3f}; |loglikelihood - llama.cpp's| mean {np.mean(gaps):.3f}, "
          f"max {max(gaps):.3f}")
    assert max(gaps) < 1.0 and np.mean(gaps) < 0.35
    assert result["acc"] >= 0.75


@pytest.mark.parametrize("name", MODELS)
def test_finetune_verb_lowers_held_out_loss(name, tmp_path):
    """4 LoRA SFT steps of 8 sentiment prompts (as for SmolLM2 in test_finetune.py); the adapter then
    loads onto the checkpoint and changes its logits."""
    import json

    from llmkit.cli import main
    from llmkit.peft.lora import load_adapter

    out = tmp_path / "run"
    assert main(["finetune", "--model", name, "--data", "movie_reviews", "--method", "lora", "--max-examples", "32",
                 "--val-fraction", "0.002", "--max-len", "48", "--batch-size", "8", "--max-steps", "4", "--lr", "1e-3",
                 "--warmup-steps", "0", "--progress", "false", "--eval-every", "0", "--lora-r", "8",
                 "--out-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    print(f"\n{name}: val loss {report['val_loss_before']:.4f} -> {report['val_loss']:.4f}")
    assert report["val_loss"] < report["val_loss_before"] - 0.1, report
    model, _ = llmkit.load(name)
    ids = torch.tensor([wikipedia_ids(name)[:32]])
    with torch.no_grad():
        before = model(ids)
        after = load_adapter(model, out / "checkpoints" / "step-0000004")(ids)
    assert not torch.allclose(before, after)
