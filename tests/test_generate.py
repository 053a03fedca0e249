"""The generation engine: parity with transformers' greedy `generate`, KV-cached decoding equal to
full recomputation, batching, seeds, streaming text, stop conditions, logprobs and bad input."""

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import llmkit
from llmkit import KVCache, ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.generate import engine
from llmkit.generate.engine import generate_tensor
from llmkit.generate.text import TextTracker
from llmkit.tokenizer import Tokenizer

TEXT = ["the cat sat on the mat. ", "a dog ran in the park! ", "héllo wörld, naïve café ", "猫が好き 🙂 "] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, vocab_size=300)


def tiny(family="llama", vocab=300, **overrides):
    torch.manual_seed(0)
    if family == "gpt2":
        config = ModelConfig.from_preset("gpt2", n_layer=2, n_head=4, d_model=64, vocab_size=vocab,
                                         max_seq_len=128, eos_token_id=None, bos_token_id=None, **overrides)
    else:
        config = ModelConfig.from_preset("llama-tiny", vocab_size=vocab, max_seq_len=128, **overrides)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger logits than the default init, so sampling is not uniform noise
        model.lm_head.weight.mul_(8.0) if not config.tie_embeddings else model.embed.weight.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


# ---- parity with transformers ----------------------------------------------------------------


def _hf_pair(tmp_path, family):
    if family == "llama":
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                          bos_token_id=1, eos_token_id=2))
    else:
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                        bos_token_id=0, eos_token_id=0))
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)  # a peaked distribution, so the greedy path is not a coin toss
    hf.save_pretrained(tmp_path)
    return hf, Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_is_token_identical_to_transformers(tmp_path, family):
    hf, ours = _hf_pair(tmp_path, family)
    prompt = torch.tensor([[5, 17, 99, 3, 42, 7, 8]])
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
    got = generate_tensor(ours, prompt, max_new_tokens=64, temperature=0, min_tokens=64)
    assert got.shape == (1, 7 + 64)
    assert torch.equal(got, expected)


def test_left_padded_batch_greedy_matches_transformers(tmp_path):
    hf, ours = _hf_pair(tmp_path, "llama")
    ids = torch.tensor([[0, 0, 0, 5, 17, 99], [4, 8, 15, 16, 23, 42]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                               min_new_tokens=24, pad_token_id=0)
    got = generate_tensor(ours, ids, mask, max_new_tokens=24, temperature=0, min_tokens=24)
    assert torch.equal(got[:, 6:], expected[:, 6:])


# ---- KV cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decode_step_equals_full_recompute(family, static):
    model = tiny(family)
    ids = torch.randint(0, 300, (2, 40))
    cache = KVCache(model.config, 2, 40)
    step = engine.DecodeStep(model, static=static)
    with torch.no_grad():
        full = model(ids)
        logits = model.lm_head(model.hidden_states(ids[:, :10], kv_cache=cache)[:, -1])
        torch.testing.assert_close(logits, full[:, 9], rtol=0, atol=1e-5)
        for t in range(10, 40):
            logits = step(ids[:, t], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-5)


def test_generated_logprobs_equal_full_recompute(model):
    out = llmkit.generate(model, None, [3, 1, 4, 1, 5], max_new_tokens=20, temperature=0.8, seed=3,
                          logprobs=2, ignore_eos=True)
    seq = torch.tensor([out.prompt_token_ids + out.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq)[0, 4:-1], dim=-1)
    expected = lp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, rtol=0, atol=1e-5)
    top = lp.topk(2, dim=-1)
    for t, d in enumerate(out.top_logprobs):
        assert list(d) == top.indices[t].tolist()


def test_echo_gives_prompt_logprobs(model):
    prompt = [3, 1, 4, 1, 5, 9, 2]
    out = llmkit.generate(model, None, prompt, max_new_tokens=1, temperature=0, echo=True)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt]))[0], dim=-1)
    expected = [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert out.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), torch.tensor(expected), rtol=0, atol=1e-5)


# ---- batching, seeds, n ----------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=11)],
                         ids=["greedy", "seeded"])
def test_batched_generation_equals_one_by_one(model, sampling):
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]
    batched = llmkit.generate(model, None, prompts, max_new_tokens=16, ignore_eos=True, **sampling)
    alone = [llmkit.generate(model, None, p, max_new_tokens=16, ignore_eos=True, **sampling) for p in prompts]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]


def test_static_decode_path_handles_left_padding(model, monkeypatch):
    """compile=True with a no-op compiler runs the fixed-shape step eagerly: padded rows still decode
    exactly as they would alone."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(engine, "_COMPILED", engine.weakref.WeakKeyDictionary())
    prompts = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    batched = llmkit.generate(model, None, prompts, max_new_tokens=12, temperature=0, ignore_eos=True, compile=True)
    alone = [llmkit.generate(model, None, p, max_new_tokens=12, temperature=0, ignore_eos=True) for p in prompts]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]


def test_same_seed_same_text_and_other_seed_differs(model, tok):
    a = llmkit.generate(model, tok, "the cat", max_new_tokens=24, seed=5, ignore_eos=True)
    b = llmkit.generate(model, tok, "the cat", max_new_tokens=24, seed=5, ignore_eos=True)
    c = llmkit.generate(model, tok, "the cat", max_new_tokens=24, seed=6, ignore_eos=True)
    assert a.text == b.text and a.token_ids == b.token_ids
    assert c.token_ids != a.token_ids


def test_near_zero_temperature_equals_greedy(model):
    greedy = llmkit.generate(model, None, [5, 6, 7], max_new_tokens=20, temperature=0, ignore_eos=True)
    cold = llmkit.generate(model, None, [5, 6, 7], max_new_tokens=20, temperature=1e-5, seed=1, ignore_eos=True)
    assert cold.token_ids == greedy.token_ids


def test_n_samples_share_the_prompt_and_differ(model):
    outs = llmkit.generate(model, None, [5, 6, 7], max_new_tokens=12, n=3, seed=2, ignore_eos=True)
    assert len(outs) == 3 and [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) == 3
    # sample i of a request is seeded with seed + i
    again = llmkit.generate(model, None, [5, 6, 7], max_new_tokens=12, seed=3, ignore_eos=True)
    assert again.token_ids == outs[1].token_ids


# ---- stopping --------------------------------------------------------------------------------


def test_stops_on_eos_and_reports_length_otherwise(model, tok):
    free = llmkit.generate(model, tok, "the dog", max_new_tokens=12, temperature=0, ignore_eos=True)
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    eos = free.token_ids[5]  # make the 6th greedy token the end of the sequence
    m = tiny()
    m.config.eos_token_id = eos
    stopped = llmkit.generate(m, tok, "the dog", max_new_tokens=12, temperature=0)
    first = free.token_ids.index(eos)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:first + 1]
    assert stopped.text == tok.decode(free.token_ids[:first])


def test_stop_string_is_matched_on_text_and_cut(model, tok):
    free = llmkit.generate(model, tok, "the cat", max_new_tokens=40, temperature=0, ignore_eos=True)
    stop = free.text[10:13]
    out = llmkit.generate(model, tok, "the cat", max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert len(out.token_ids) < 40


def test_min_tokens_delays_eos(model, tok):
    m = tiny()
    free = llmkit.generate(m, None, [9, 9], max_new_tokens=10, temperature=0, ignore_eos=True)
    m.config.eos_token_id = free.token_ids[0]
    assert len(llmkit.generate(m, None, [9, 9], max_new_tokens=10, temperature=0).token_ids) == 1
    out = llmkit.generate(m, None, [9, 9], max_new_tokens=10, temperature=0, min_tokens=4)
    assert len(out.token_ids) >= 4 and free.token_ids[0] not in out.token_ids[:3]


def test_prompt_near_context_end_finishes_with_length(model):
    out = llmkit.generate(model, None, list(range(1, 126)), max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 128 - 125 and out.finish_reason == "length"


# ---- streaming -------------------------------------------------------------------------------


def test_text_tracker_never_splits_a_character(tok):
    text = "héllo 🙂 猫 wörld"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    tracker = TextTracker(tok)
    chunks = [tracker.push(i) for i in ids] + [tracker.finish()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert any(c == "" for c in chunks)  # some tokens were half a character: held back


def test_text_tracker_holds_back_possible_stop_string(tok):
    tracker = TextTracker(tok, stop_strings=["cat."])
    chunks = [tracker.push(i) for i in tok.encode("the ca")]
    assert "".join(chunks) == "the "  # "ca" may become "cat."
    chunks += [tracker.push(i) for i in tok.encode("t.")]
    assert "".join(chunks) + tracker.finish() == "the "
    assert tracker.stopped


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(seed=4, stop=["e"])], ids=["plain", "stop"])
def test_stream_yields_exactly_the_final_text(model, tok, sampling):
    final = llmkit.generate(model, tok, "猫が", max_new_tokens=30, ignore_eos=True, **sampling)
    chunks = list(llmkit.stream(model, tok, "猫が", max_new_tokens=30, ignore_eos=True, **sampling))
    assert len(chunks) == len(final.token_ids)  # one chunk per generated token
    assert [c.token_id for c in chunks] == final.token_ids
    assert "".join(c.text for c in chunks) == final.text
    assert chunks[-1].finish_reason == final.finish_reason and all(c.finish_reason is None for c in chunks[:-1])


# ---- the compiled decode step ------------------------------------------------------------------


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = tiny()
    expected = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=8, temperature=0, ignore_eos=True)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="no compiler here"):
        out = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=8, temperature=0, ignore_eos=True, compile=True)
    assert out.token_ids == expected.token_ids


def test_compiled_step_that_fails_at_run_time_falls_back(monkeypatch):
    model = tiny()
    expected = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=8, temperature=0, ignore_eos=True)

    def compiles_but_fails(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", compiles_but_fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=8, temperature=0, ignore_eos=True, compile=True)
    assert out.token_ids == expected.token_ids
    assert sum("inductor exploded" in str(w.message) for w in caught) == 1


@pytest.mark.slow
def test_compiled_decode_equals_eager():
    model = tiny()
    eager = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=12, temperature=0, ignore_eos=True,
                               logprobs=0, compile=True)
    # a fallback to eager would make this test meaningless
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]
    assert engine._COMPILED[model][1] is not None
    assert comp.token_ids == eager.token_ids
    torch.testing.assert_close(torch.tensor(comp.logprobs), torch.tensor(eager.logprobs), rtol=0, atol=1e-5)
    # the step is compiled with dynamic shapes: another prompt and cache length, and another batch of
    # more than one row, reuse the graphs already made (one for a single row, one for 2-16 rows)
    from torch._dynamo.utils import counters

    comp2 = llmkit.generate(model, None, [[1, 2], [3, 4, 5]], max_new_tokens=5, temperature=0, ignore_eos=True,
                            compile=True)
    graphs = counters["stats"]["unique_graphs"]
    again = llmkit.generate(model, None, [4, 5, 6, 7, 8], max_new_tokens=70, temperature=0, ignore_eos=True,
                            compile=True)
    more = llmkit.generate(model, None, [[1], [2], [3, 4, 5, 6]], max_new_tokens=9, temperature=0, ignore_eos=True,
                           compile=True)
    assert len(again.token_ids) == 70 and [len(c.token_ids) for c in comp2 + more] == [5, 5, 9, 9, 9]
    assert counters["stats"]["unique_graphs"] == graphs, "another length or batch size compiled again"


@pytest.mark.slow
def test_compiled_steps_of_differently_built_models_stay_apart():
    # module guards are skipped for speed: each model must still run its own graph, not the first's
    from llmkit.quant import quantize

    full = tiny()
    packed = quantize(tiny(), bits=8)
    kw = dict(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    eager = [llmkit.generate(m, None, [1, 2, 3], **kw) for m in (full, packed)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = [llmkit.generate(m, None, [1, 2, 3], compile=True, **kw) for m in (full, packed)]
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]
    for e, c in zip(eager, compiled, strict=True):
        assert c.token_ids == e.token_ids
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_model_whose_modules_are_swapped_after_compiling_is_compiled_again():
    # the compiled step does not re-check modules: quantizing (or adding LoRA) in place must not reuse it
    from llmkit.quant import quantize

    model = tiny()
    kw = dict(max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
    llmkit.generate(model, None, [1, 2, 3], compile=True, **kw)
    quantize(model, bits=8)
    eager = llmkit.generate(model, None, [1, 2, 3], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = llmkit.generate(model, None, [1, 2, 3], compile=True, **kw)
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]  # the stale graph fails into eager
    assert compiled.token_ids == eager.token_ids
    torch.testing.assert_close(torch.tensor(compiled.logprobs), torch.tensor(eager.logprobs), rtol=0, atol=1e-4)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,kwargs,match", [
    ([1, 2], dict(temperature=-1.0), "temperature"),
    ([1, 2], dict(top_p=0.0), "top_p"),
    ([1, 2], dict(top_p=1.01), "top_p"),
    ([1, 2], dict(top_k=-3), "top_k"),
    ([1, 2], dict(max_new_tokens=-1), "max_new_tokens"),
    (list(range(1, 129)), dict(), "context"),
    ([], dict(), "empty"),
    ("", dict(), "empty"),
    ([1, 999], dict(), "vocabulary"),
    ([1, 2], dict(temprature=0.5), "temprature"),
])
def test_bad_input_raises_one_clear_error(model, tok, prompt, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        llmkit.generate(model, tok, prompt, **kwargs)


def test_zero_new_tokens_returns_empty_completion(model, tok):
    out = llmkit.generate(model, tok, "the cat", max_new_tokens=0)
    assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
