"""Continuous batching: requests that join and leave a running batch get what they would get alone
through `llmkit.generate` (greedy and seeded), the cache budget holds requests back, cancelling
frees rows, and a failing request does not take the batch down."""

import sys
import threading

import pytest
import torch

import llmkit
from llmkit import KVCache, ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.generate.sampling import SamplingParams
from llmkit.serve.scheduler import MIN_CHUNK, Overloaded, Scheduler
from llmkit.tokenizer import Tokenizer

TEXT = ["the cat sat on the mat. ", "a dog ran in the park! ", "héllo wörld, naïve café "] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=300, max_seq_len=128)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # peaked distributions: greedy paths are not decided by rounding
    return m


class Sink:
    """Collects what the scheduler emits for one request."""

    def __init__(self):
        self.chunks, self.ended, self.error = [], False, None

    def __call__(self, item):
        if item is None:
            self.ended = True
        elif isinstance(item, Exception):
            self.error = item
        else:
            self.chunks.append(item)


def drain(scheduler, limit=500):
    for _ in range(limit):
        if not scheduler.waiting and not scheduler.rows and not scheduler.filling:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


PROMPTS = ["the cat", "a dog ran in the park", "héllo", "the mat. a dog", "café naïve wörld sat on"]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, top_k=50, seed=7),
                                      dict(temperature=0.7, seed=3, n=2, repetition_penalty=1.3,
                                           frequency_penalty=0.5, presence_penalty=0.3, logprobs=3)],
                         ids=["greedy", "seeded", "n2-penalties-logprobs"])
def test_requests_joining_at_different_steps_equal_each_run_alone(model, tok, sampling):
    scheduler = Scheduler(model, tok)
    lengths = [20, 7, 25, 12, 16]
    joins = {0: [0, 1], 3: [2], 4: [3], 15: [4]}  # step -> requests that arrive before it
    sinks, requests = {}, {}
    for step in range(200):
        for i in joins.get(step, []):
            params = SamplingParams(max_new_tokens=lengths[i], **sampling)
            sinks[i] = Sink()
            requests[i] = scheduler.submit(tok.encode(PROMPTS[i], add_special_tokens=True), params, sinks[i])
        if step > 15 and not scheduler.rows and not scheduler.waiting:
            break
        scheduler.step()
    for i, request in requests.items():
        alone = llmkit.generate(model, tok, PROMPTS[i], max_new_tokens=lengths[i], **sampling)
        alone = alone if isinstance(alone, list) else [alone]
        assert sinks[i].ended and sinks[i].error is None
        for got, want in zip(request.completions, alone, strict=True):
            assert got.token_ids == want.token_ids
            assert got.text == want.text and got.finish_reason == want.finish_reason
            if want.logprobs is not None:
                torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs),
                                           rtol=0, atol=1e-5)
                assert [list(t) for t in got.top_logprobs] == [list(t) for t in want.top_logprobs]
        streamed = {}
        for c in sinks[i].chunks:
            streamed[c.index] = streamed.get(c.index, "") + c.text
        assert [streamed[j] for j in range(len(alone))] == [c.text for c in request.completions]


def test_compiled_scheduler_gives_each_request_what_it_gets_alone_at_every_batch_size(model, tok):
    """compile=True: the batch grows from one row past COMPILED_ROWS (eager above it) and shrinks back
    to one; every request still gets what eager `llmkit.generate` gives it alone: the same tokens, and
    logprobs within 1e-4 (compiled kernels may sum in another order; measured ~1e-6)."""
    import warnings

    from llmkit.generate import engine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = Scheduler(model, tok, compile=True, max_rows=24)  # compiles the 1-row and 2-16-row graphs
        lengths = [30 - i for i in range(20)]
        sinks, requests, sizes = {}, {}, []
        for step in range(200):
            if step < 20:
                params = SamplingParams(max_new_tokens=lengths[step], temperature=0, ignore_eos=True, logprobs=0)
                sinks[step] = Sink()
                requests[step] = scheduler.submit(tok.encode(PROMPTS[step % 5], add_special_tokens=True), params,
                                                  sinks[step])
            elif not scheduler.rows and not scheduler.waiting and not scheduler.filling:
                break
            scheduler.step()
            sizes.append(len(scheduler.rows))
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]
    assert engine._COMPILED[model][1] is not None
    assert 1 in sizes and max(sizes) > engine.COMPILED_ROWS and any(1 < n <= engine.COMPILED_ROWS for n in sizes)
    for i, request in requests.items():
        alone = llmkit.generate(model, tok, PROMPTS[i % 5], max_new_tokens=lengths[i], temperature=0,
                                ignore_eos=True, logprobs=0)
        got = request.completions[0]
        assert sinks[i].ended and got.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), rtol=0, atol=1e-4)


def test_release_openmp_workers_finds_the_runtime():
    """The scheduler thread's speed depends on freeing the loading thread's OpenMP pool: the call
    must reach the runtime torch uses here (not silently do nothing), and torch works after it."""
    import ctypes

    from llmkit.serve.scheduler import release_openmp_workers

    assert ctypes.CDLL(None).omp_pause_resource_all  # torch's OpenMP, loaded globally
    release_openmp_workers()
    a = torch.randn(256, 256)
    torch.testing.assert_close(a @ a, (a.double() @ a.double()).float(), rtol=1e-4, atol=1e-3)


def test_batch_really_is_shared_and_rows_leave(model, tok):
    scheduler = Scheduler(model, tok)
    sizes = []
    for n_new in (3, 9):
        scheduler.submit(tok.encode("the cat"), SamplingParams(max_new_tokens=n_new, temperature=0, ignore_eos=True),
                         Sink())
    while scheduler.rows or scheduler.waiting:
        scheduler.step()
        sizes.append(len(scheduler.rows))
    assert sizes[:2] == [2, 2] and sizes[-2:] == [1, 0]
    assert scheduler.cache is None


def test_echo_with_max_tokens_zero_gives_prompt_logprobs(model, tok):
    scheduler = Scheduler(model, tok)
    ids = tok.encode("a dog ran in the park")
    sink = Sink()
    request = scheduler.submit(ids, SamplingParams(max_new_tokens=0, echo=True, logprobs=1), sink)
    drain(scheduler)
    out = request.completions[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    assert out.token_ids == [] and out.finish_reason == "length" and sink.ended
    expected = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    torch.testing.assert_close(torch.tensor(out.prompt_logprobs[1:]), torch.tensor(expected), rtol=0, atol=1e-5)
    alone = llmkit.generate(model, tok, ids, max_new_tokens=0, echo=True, logprobs=1)
    assert alone.prompt_logprobs == out.prompt_logprobs and alone.prompt_top_logprobs == out.prompt_top_logprobs
    # the chosen and the top logprob come from one log-softmax: equal exactly when the token is the argmax
    for i, (chosen, top) in enumerate(zip(out.prompt_logprobs[1:], out.prompt_top_logprobs[1:], strict=True)):
        assert (chosen == max(top.values())) == (int(lp[i].argmax()) == ids[i + 1])


def test_budget_queues_requests_then_refuses(model, tok):
    # each request reserves 1 row x (3 prompt + 10 new + 2 spare) = 15 tokens: two fit in 30
    scheduler = Scheduler(model, tok, kv_budget=30, max_waiting=2, room=2)
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    ids = [5, 6, 7]
    reqs = [scheduler.submit(ids, params, Sink()) for _ in range(2)]
    scheduler.step()
    assert len(scheduler.running) == 2 and not scheduler.waiting
    reqs += [scheduler.submit(ids, params, Sink()) for _ in range(2)]
    with pytest.raises(Overloaded, match="already waiting"):
        scheduler.submit(ids, params, Sink())
    scheduler.step()
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 2  # no room until one ends
    assert scheduler.kv_usage() <= 1.0
    drain(scheduler)
    assert all(r.done for r in reqs)
    with pytest.raises(ConfigError, match="budget of 30 tokens"):
        scheduler.submit(ids, SamplingParams(max_new_tokens=40), Sink())


def test_cancel_frees_the_rows_at_the_next_step(model, tok):
    scheduler = Scheduler(model, tok)
    params = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    keep, drop = Sink(), Sink()
    kept = scheduler.submit(tok.encode("the cat"), params, keep)
    dropped = scheduler.submit(tok.encode("a dog"), SamplingParams(max_new_tokens=50, temperature=0, n=2,
                                                                 ignore_eos=True), drop)
    for _ in range(5):
        scheduler.step()
    assert len(scheduler.rows) == 3
    scheduler.cancel(dropped)
    scheduler.step()
    assert len(scheduler.rows) == 1 and scheduler.cache.batch_size == 1
    assert [s.out.finish_reason for s in dropped.seqs] == ["abort", "abort"] and not drop.ended
    assert 'finished_reason="abort"} 1.0' in scheduler.metrics.render()
    drain(scheduler)
    assert kept.completions[0].token_ids == llmkit.generate(model, tok, "the cat", **vars_of(params)).token_ids


def vars_of(params):
    return dict(max_new_tokens=params.max_new_tokens, temperature=params.temperature, ignore_eos=params.ignore_eos)


def test_background_thread_serves_concurrent_submitters(model, tok):
    scheduler = Scheduler(model, tok).start()
    try:
        done = {i: threading.Event() for i in range(6)}
        sinks = {}

        def emit_for(i):
            sink = Sink()
            sinks[i] = sink

            def emit(item):
                sink(item)
                if item is None or isinstance(item, Exception):
                    done[i].set()
            return emit

        requests = [scheduler.submit(tok.encode(PROMPTS[i % 5]), SamplingParams(max_new_tokens=10 + i, temperature=0),
                                     emit_for(i)) for i in range(6)]
        assert all(e.wait(60) for e in done.values())
        for i, r in enumerate(requests):
            want = llmkit.generate(model, tok, PROMPTS[i % 5], max_new_tokens=10 + i, temperature=0)
            assert r.completions[0].token_ids == want.token_ids
        text = scheduler.metrics.render()
        assert "llmkit:num_requests_running 0.0" in text and "llmkit:time_to_first_token_seconds_count 6.0" in text
    finally:
        scheduler.stop()


def test_a_failing_prefill_fails_only_its_request(model, tok, monkeypatch):
    scheduler = Scheduler(model, tok)
    good = Sink()
    scheduler.submit(tok.encode("the cat"), SamplingParams(max_new_tokens=5, temperature=0), good)
    scheduler.step()
    bad = Sink()
    scheduler.submit(tok.encode("a dog"), SamplingParams(max_new_tokens=5, temperature=0), bad)
    from llmkit.serve import scheduler as module

    real = module.PromptFill.advance
    monkeypatch.setattr(module.PromptFill, "advance", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    scheduler.step()
    monkeypatch.setattr(module.PromptFill, "advance", real)
    drain(scheduler)
    assert isinstance(bad.error, RuntimeError) and good.ended and good.error is None


def test_stack_right_aligns_rows_and_drops_unused_slots(model):
    cfg = model.config
    a, b = KVCache(cfg, 1, 10), KVCache(cfg, 2, 10)
    a.keys[0][:, :, :4] = 1.0
    a.valid[:, :4], a.length = True, 4
    b.keys[0][:, :, 1:3] = 2.0
    b.valid[:, 1:3], b.length = True, 3  # slot 0 unused by every row of b
    out = KVCache.stack([a, b], room=5)
    assert out.length == 4 and out.max_len == 9 and out.batch_size == 3
    assert out.valid[:, :4].tolist() == [[True] * 4, [False, False, True, True], [False, False, True, True]]
    assert bool((out.keys[0][1:, :, 2:4] == 2).all()) and bool((out.keys[0][1:, :, :2] == 0).all())


def test_a_request_whose_sampling_fails_leaves_the_others_exactly_as_alone(model, tok, monkeypatch):
    """The draw of one request fails at its third token, mid-batch (what an overflowing temperature did
    before SamplingParams refused it). It ends alone with the error; a greedy and a seeded request
    sampled earlier in the same steps stream exactly their solo tokens, each token once, and their
    generators are not drawn twice."""
    engine = sys.modules["llmkit.generate.engine"]  # the package name `llmkit.generate` is also a function
    real, calls = engine.sample, []
    failing = SamplingParams(max_new_tokens=8, temperature=0.8, seed=11)

    def sample(logits, params, generators=None):
        if params is failing:
            calls.append(1)
            if len(calls) >= 3:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generators)

    monkeypatch.setattr(engine, "sample", sample)
    scheduler = Scheduler(model, tok)
    settings = [dict(max_new_tokens=8, temperature=0), dict(max_new_tokens=8, temperature=0.9, seed=7, logprobs=2)]
    sinks = [Sink() for _ in settings]
    kept = [scheduler.submit(tok.encode("the cat"), SamplingParams(**kw), sink) for kw, sink in zip(settings, sinks, strict=True)]
    bad = Sink()
    scheduler.submit(tok.encode("a dog"), failing, bad)
    drain(scheduler)
    assert isinstance(bad.error, RuntimeError) and len(bad.chunks) == 2
    for kw, request, sink in zip(settings, kept, sinks, strict=True):
        alone = llmkit.generate(model, tok, "the cat", **kw)
        assert sink.error is None and sink.ended
        assert [c.token_id for c in sink.chunks] == request.completions[0].token_ids == alone.token_ids
        if alone.logprobs is not None:  # a batch of 3 rows rounds its GEMMs differently from 1 row: fp32 noise
            assert request.completions[0].logprobs == pytest.approx(alone.logprobs, abs=1e-5)


# ---- chunked prefill and prefix caching -------------------------------------------------------------

LONG = "the cat sat on the mat. a dog ran in the park! héllo wörld, naïve café " * 2


def run_alone(scheduler, prompt, params):
    sink = Sink()
    request = scheduler.submit(prompt, params, sink)
    drain(scheduler)
    return request.completions, sink


def test_chunked_prefill_equals_whole_prefill(model, tok):
    """A 5-token chunk budget: the prompt runs in many forward calls, the results equal one call's
    (tokens exactly; logprobs to 1e-5, the rounding of different GEMM shapes), with echo too."""
    prompt = tok.encode(LONG)
    params = dict(max_new_tokens=8, temperature=0, logprobs=2, echo=True)
    got, _ = run_alone(Scheduler(model, tok, prefill_chunk=5), prompt, SamplingParams(**params))
    want = llmkit.generate(model, tok, prompt, **params)
    assert got[0].token_ids == want.token_ids
    assert got[0].logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert got[0].prompt_logprobs[0] is None and want.prompt_logprobs[0] is None
    assert got[0].prompt_logprobs[1:] == pytest.approx(want.prompt_logprobs[1:], abs=1e-5)
    assert [list(t) for t in got[0].prompt_top_logprobs[1:]] == [list(t) for t in want.prompt_top_logprobs[1:]]


def test_a_long_prompt_is_prefilled_between_decode_steps(model, tok):
    """While a long prompt is prefilled 10 tokens a step, the running request gets a token every step."""
    scheduler = Scheduler(model, tok, prefill_chunk=10)
    running = Sink()
    scheduler.submit(tok.encode("the cat"), SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True), running)
    scheduler.step()
    prompt = tok.encode(LONG)
    waiting = Sink()
    scheduler.submit(prompt, SamplingParams(max_new_tokens=4, temperature=0), waiting)
    steps = 0
    while not waiting.chunks:
        before = len(running.chunks)
        scheduler.step()
        steps += 1
        assert len(running.chunks) == before + 1  # no step went without a token for the running stream
    assert steps == -(-len(prompt) // 10)  # the prompt took ceil(len / 10) steps
    drain(scheduler)
    assert [c.token_id for c in waiting.chunks] == llmkit.generate(model, tok, prompt, max_new_tokens=4,
                                                                   temperature=0).token_ids


def test_chunks_shrink_to_the_step_time_while_a_stream_runs(model, tok):
    """With a step time no chunk can meet, a prompt's first chunk (no rate measured yet) takes the
    token budget and every later one MIN_CHUNK tokens while a stream is running; with no stream
    running, the budget alone. The tokens equal a whole prefill's either way."""
    prompt = tok.encode(LONG * 2)
    want = llmkit.generate(model, tok, prompt, max_new_tokens=4, temperature=0).token_ids
    for stream in (True, False):
        scheduler = Scheduler(model, tok, prefill_chunk=40, step_seconds=1e-9)
        if stream:
            scheduler.submit(tok.encode("the cat"), SamplingParams(max_new_tokens=200, temperature=0,
                                                                   ignore_eos=True), Sink())
            scheduler.step()
        waiting = Sink()
        request = scheduler.submit(prompt, SamplingParams(max_new_tokens=4, temperature=0), waiting)
        scheduler.step()  # admits it; its first chunk
        chunks, done = [], 0
        while request.fill is not None:
            chunks.append(request.fill.done - done)
            done = request.fill.done
            scheduler.step()
        chunks.append(len(prompt) - done)
        assert len(chunks) >= 3, chunks  # the prompt is long enough to show the cap
        if stream:
            assert chunks[0] == 40 and all(c == MIN_CHUNK for c in chunks[1:-1]) and chunks[-1] <= MIN_CHUNK
        else:
            assert all(c == 40 for c in chunks[:-1]) and chunks[-1] <= 40
        drain(scheduler)
        assert [c.token_id for c in waiting.chunks] == want
    with pytest.raises(ConfigError, match="step_seconds=-1"):
        Scheduler(model, tok, step_seconds=-1)


def test_prefix_cache_reuses_blocks_and_gives_the_same_tokens(model, tok):
    """A second prompt that extends the first reuses its full 16-token blocks; its tokens equal the
    uncached run's exactly and its logprobs to 1e-5 (the suffix is computed by a shorter GEMM)."""
    first = tok.encode(LONG)
    second = first + tok.encode(" the cat sat")
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3, logprobs=3)
    cached = Scheduler(model, tok, prefix_cache=1024)
    run_alone(cached, first, params)
    got, _ = run_alone(cached, second, params)
    hits = cached.metrics.counters["prefix_cache_hits_total"]
    assert hits == (len(first) // 16) * 16 and cached.metrics.counters["prefix_cache_queries_total"] == len(first) + len(second)
    want, _ = run_alone(Scheduler(model, tok), second, params)
    assert got[0].token_ids == want[0].token_ids
    assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-5)
    assert [list(t) for t in got[0].top_logprobs] == [list(t) for t in want[0].top_logprobs]


def test_prefix_cache_eviction_under_a_small_budget_loses_no_request(model, tok):
    """Room for two blocks and eight prompts of ~9 blocks that share their start, seven of them sent
    together once the first is stored: blocks are evicted as each prompt is stored, deepest first, so
    the shared two stay and all seven hit them; every request completes with its solo tokens, and the
    cache never holds more than 32 tokens."""
    prompts = [tok.encode(LONG + f" {i} the cat") for i in range(8)]
    scheduler = Scheduler(model, tok, prefix_cache=32, prefill_chunk=40)
    sinks = [Sink() for _ in prompts]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    requests = [scheduler.submit(prompts[0], params, sinks[0])]
    while scheduler.filling or scheduler.waiting:  # the first prompt's blocks are stored; it decodes on
        scheduler.step()
    requests += [scheduler.submit(p, params, s) for p, s in zip(prompts[1:], sinks[1:], strict=True)]
    for _ in range(200):
        if not scheduler.waiting and not scheduler.rows and not scheduler.filling:
            break
        scheduler.step()
        assert scheduler.prefix.tokens <= 32
    for p, request, sink in zip(prompts, requests, sinks, strict=True):
        assert sink.ended and sink.error is None
        assert request.completions[0].token_ids == llmkit.generate(model, tok, p, max_new_tokens=6, temperature=0).token_ids
    assert len(scheduler.prefix.blocks) == 2 and scheduler.metrics.counters["prefix_cache_hits_total"] == 7 * 32


def test_a_burst_of_short_prompts_is_prefilled_in_groups_of_alike_lengths(model, tok, monkeypatch):
    """Prompts admitted together that fit the budget run as left-padded batches of up to PREFILL_GROUP,
    shortest first (11 prompts: one `prefill` call of 8, one of 3, every first token out in the step),
    and each request still gets what it gets alone; the prefix cache keeps each row's blocks at its
    own offset, so a later prompt sharing one's start reuses them and gives the same tokens."""
    from llmkit.serve import scheduler as module

    calls = []
    batched = module.prefill
    monkeypatch.setattr(module, "prefill", lambda *a, **k: calls.append([len(p) for p in a[1]]) or batched(*a, **k))
    scheduler = Scheduler(model, tok, prefix_cache=4096)
    prompts = [PROMPTS[i % 5] * (1 + i % 3) for i in range(11)]
    params = dict(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    sinks = [Sink() for _ in prompts]
    ids = [tok.encode(p, add_special_tokens=True) for p in prompts]
    requests = [scheduler.submit(i, SamplingParams(**params), sink) for i, sink in zip(ids, sinks, strict=True)]
    scheduler.step()
    assert [len(c) for c in calls] == [module.PREFILL_GROUP, 11 - module.PREFILL_GROUP]
    assert sum(calls, []) == sorted(len(i) for i in ids)
    assert all(len(s.chunks) == 1 for s in sinks)  # every first token out
    drain(scheduler)
    for prompt, request in zip(prompts, requests, strict=True):
        want = llmkit.generate(model, tok, prompt, **params)
        assert request.completions[0].token_ids == want.token_ids
        assert request.completions[0].logprobs == pytest.approx(want.logprobs, abs=1e-5)
    longest = max(prompts, key=len)
    again = longest + " the end"
    hits = scheduler.metrics.counters.get("prefix_cache_hits_total", 0)
    got, _ = run_alone(scheduler, tok.encode(again, add_special_tokens=True), SamplingParams(**params))
    assert scheduler.metrics.counters["prefix_cache_hits_total"] - hits >= 16  # a block from the batch
    assert got[0].token_ids == llmkit.generate(model, tok, again, **params).token_ids


def test_a_failing_batched_prefill_falls_back_to_each_prompt_alone(model, tok, monkeypatch):
    """If the batch's forward fails, each prompt is prefilled alone in the same step: none is lost."""
    from llmkit.serve import scheduler as module

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the batch")

    monkeypatch.setattr(module, "prefill", broken)
    scheduler = Scheduler(model, tok)
    params = dict(max_new_tokens=5, temperature=0, ignore_eos=True)
    sinks = [Sink() for _ in range(3)]
    requests = [scheduler.submit(tok.encode(PROMPTS[i], add_special_tokens=True), SamplingParams(**params), sink)
                for i, sink in enumerate(sinks)]
    scheduler.step()
    assert all(len(s.chunks) == 1 and s.error is None for s in sinks)
    drain(scheduler)
    for i, request in enumerate(requests):
        assert request.completions[0].token_ids == llmkit.generate(model, tok, PROMPTS[i], **params).token_ids
