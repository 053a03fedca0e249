"""One forward path over one cache, for every architecture feature at once: a Gemma-3-like model
(sliding and full layers, their own RoPE bases, QK-norm, sandwich norms, (1 + w) RMSNorm, scaled
embeddings, a custom attention scale, q/k/v biases) decodes from its cache -- whose sliding layers
keep only `window` slots in a ring buffer -- exactly as the full forward computes, dynamic, static,
compiled, chunked and continuously batched (left padding past the window: tests/test_model.py's
gemma3 family). Parity with transformers is in
tests/test_families_formats.py; these are the invariants that hold whatever the reference."""

import pytest
import torch

import llmkit
from llmkit import KVCache, ModelConfig, Transformer
from llmkit.generate import engine
from llmkit.generate.sampling import SamplingParams
from llmkit.model import ring_slots
from llmkit.serve.scheduler import Scheduler

ATOL = 1e-5  # fp32: the cached and the full computation differ only in summation order
WINDOW = 8
LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def gemma_like(**overrides) -> Transformer:
    config = ModelConfig(**{**dict(
        vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, d_model=64, head_dim=32, d_ff=128, max_seq_len=128,
        activation="gelu_tanh", norm_offset=1.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
        attn_scale=24 ** -0.5, qkv_bias=True, sliding_window=WINDOW, layer_types=LAYERS, rope_theta=1e6,
        rope_local_theta=1e4, tie_embeddings=True), **overrides})
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # perturbed norms and biases, so a dropped one changes the logits
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(4.0)  # peaked distributions: greedy paths are not decided by rounding
    return model


def test_sliding_layers_see_only_their_window():
    model = gemma_like()
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        full = model(ids)
        # Changing a token more than WINDOW positions back changes the output only through the full layer;
        # with the full layer made sliding too, nothing beyond the window can reach the last position.
        only_sliding = gemma_like(layer_types=["sliding_attention"] * 4)
        changed = ids.clone()
        changed[0, 0] = (ids[0, 0] + 1) % 300
        a, b = only_sliding(ids)[0, -1], only_sliding(changed)[0, -1]
        # 4 layers of a window of 8 reach back 4 * 7 = 28 positions: position 29 cannot see position 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(model(changed)[0, -1], full[0, -1])
        assert not torch.allclose(only_sliding(changed)[0, 27], a)  # while a position within reach does change


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_prefill_and_32_steps_past_the_window_equal_the_full_forward(static):
    model = gemma_like()
    ids = torch.randint(0, 300, (2, 48))
    cache = KVCache(model.config, 2, 64)
    assert [k.shape[2] for k in cache.keys] == [WINDOW, WINDOW, 64, WINDOW]  # rings for the sliding layers
    step = engine.DecodeStep(model, static=static)
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids[:, :16], kv_cache=cache), full[:, :16], rtol=0, atol=ATOL)
        for t in range(16, 48):
            torch.testing.assert_close(step(ids[:, t], cache), full[:, t], rtol=0, atol=ATOL)


def test_chunked_prefill_across_the_ring_equals_the_full_forward():
    model = gemma_like()
    ids = torch.randint(0, 300, (1, 60))
    cache = KVCache(model.config, 1, 64)
    with torch.no_grad():
        full = model(ids)
        pieces, start = [], 0
        for size in (3, 11, 1, 5, 20, 1, 19):  # shorter than, equal to and longer than the window
            pieces.append(model(ids[:, start:start + size], kv_cache=cache))
            start += size
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=ATOL)


def test_generation_batched_compiled_and_scheduled_equals_alone():
    model = gemma_like()
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8, 9], [7, 7]]
    alone = [llmkit.generate(model, None, p, max_new_tokens=30, temperature=0, ignore_eos=True).token_ids
             for p in prompts]
    batched = llmkit.generate(model, None, prompts, max_new_tokens=30, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in batched] == alone
    compiled = llmkit.generate(model, None, prompts, max_new_tokens=30, temperature=0, ignore_eos=True, compile=True)
    assert [o.token_ids for o in compiled] == alone
    # continuous batching: rows join at different steps, the cache is restacked (rings moved) as they do
    scheduler, requests = Scheduler(model, None), []
    for step in range(200):
        if step < len(prompts):
            requests.append(scheduler.submit(prompts[step], SamplingParams(max_new_tokens=30, temperature=0,
                                                                            ignore_eos=True), lambda item: None))
        if step >= len(prompts) and not scheduler.rows and not scheduler.waiting:
            break
        scheduler.step()
    assert [r.completions[0].token_ids for r in requests] == alone


def test_ring_slots_and_kv_memory():
    assert ring_slots(3, 4).tolist() == [0, 1, 2, -1]
    assert ring_slots(10, 4).tolist() == [8, 9, 6, 7]  # slot s at entry s % 4: the last four slots
    config = gemma_like().config
    full = KVCache(config.replace(sliding_window=None, layer_types=None), 1, 4096).nbytes
    ringed = KVCache(config, 1, 4096).nbytes
    per_layer = full // 4
    assert ringed == per_layer + 3 * per_layer * WINDOW // 4096  # one full layer, three rings of WINDOW slots


def test_flops_and_kv_summary_count_the_window():
    """Attention FLOPs of a sliding layer stop at the window; `llmkit info`'s KV bytes are an allocated cache's."""
    from llmkit.analysis.accounting import model_summary

    model = gemma_like()
    c, n = model.config, 100
    full = Transformer(c.replace(sliding_window=None, layer_types=None))
    attention = 4 * c.n_head * c.head_dim
    assert full.flops_per_token(n, training=False) - model.flops_per_token(n, training=False) == \
        attention * 3 * (n - WINDOW)  # three sliding layers attend to WINDOW keys, not n
    summary = model_summary(c, seq_len=n)
    assert summary["family"] is None  # q/k/v biases on Gemma-3's layout: no transformers family computes it
    assert model_summary(c.replace(qkv_bias=False))["family"] == "gemma3_text"
    assert summary["kv_cache_bytes"]["float32"] == KVCache(c, 1, n).nbytes
    assert summary["kv_cache_bytes"]["bfloat16"] == KVCache(c, 1, n, dtype=torch.bfloat16).nbytes
