"""Mixture-of-experts blocks: parity with transformers' Mixtral and Qwen2-MoE (HF folders both ways),
the router losses against transformers' `load_balancing_loss_func` and hand computations, the three
dispatch paths against each other, KV-cached and compiled decoding against the full forward, the
training objective's sum, and the config's refusals.

The tiny models have random norms (gains in [0.5, 1.5]) and weights of std 0.1, so a wrong mapping
or a wrong renormalisation shows in the logits far above the tolerances.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from llmkit import ConfigError, FormatError, ModelConfig
from llmkit.analysis.accounting import model_summary, training_memory
from llmkit.losses import expert_load, load_balancing_loss, router_z_loss
from llmkit.model import KVCache, Transformer
from llmkit.moe import MoE, inactive_parameters, router_logits
from llmkit.train.objectives import causal_lm_loss

IDS = [[5, 17, 250, 3, 99, 42, 7, 311, 64, 12, 200, 9, 77, 150]]
# Same float32 math up to summation order (our experts' rows are grouped, HF's are per expert too,
# but the routed sum and the matmul blocking differ): 1e-5 absolute on logits of size ~1.
PARITY_ATOL = 1e-5


def _mixtral(**changes) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(**{
        **dict(vocab_size=320, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
               rms_norm_eps=1e-6, tie_word_embeddings=False), **changes})


def _qwen2_moe(**changes) -> transformers.Qwen2MoeConfig:
    return transformers.Qwen2MoeConfig(**{
        **dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
               shared_expert_intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
               rms_norm_eps=1e-6, tie_word_embeddings=False), **changes})


def _random_hf(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return model.eval()


def _random_ours(config: ModelConfig, seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return model.eval()


def _tiny(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=48,
                                 max_seq_len=128, n_experts=4, experts_per_token=2), **changes})


MAKERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe,
          "qwen2_moe-renormalised": lambda: _qwen2_moe(norm_topk_prob=True),
          "mixtral-top1": lambda: _mixtral(num_experts_per_tok=1, num_local_experts=3),
          "mixtral-sliding": lambda: _mixtral(sliding_window=4)}  # 14 tokens: the window matters


@pytest.mark.parametrize("kind", MAKERS)
def test_logits_equal_transformers_both_directions(kind, tmp_path):
    theirs = _random_hf(MAKERS[kind]())
    theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.tensor(IDS)
    ours = Transformer.from_pretrained(tmp_path / "theirs")
    assert ours.config.hf_model_type == theirs.config.model_type
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=PARITY_ATOL, rtol=0)

    mine = _random_ours(ours.config)
    mine.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    assert type(back).__name__ == type(theirs).__name__
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, mine(ids), atol=PARITY_ATOL, rtol=0)
    assert Transformer.from_pretrained(tmp_path / "ours").config == mine.config


def test_config_json_carries_the_router_fields(tmp_path):
    config = _tiny(n_experts=6, experts_per_token=3, shared_expert_d_ff=40, moe_renormalize=False, qkv_bias=True,
                   router_aux_loss_coef=0.02, router_z_loss_coef=0.005)
    assert config.hf_model_type == "qwen2_moe"
    hf = config.to_hf_config()
    theirs = transformers.Qwen2MoeConfig(**hf)
    assert (theirs.num_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size,
            theirs.shared_expert_intermediate_size, theirs.norm_topk_prob, theirs.router_aux_loss_coef) == \
        (6, 3, 48, 40, False, 0.02)
    assert ModelConfig.from_hf_config(json.loads(json.dumps(hf))) == config
    assert _tiny().hf_model_type == "mixtral"


# ---- router losses -----------------------------------------------------------------------------


def test_load_balancing_loss_equals_transformers():
    torch.manual_seed(0)
    logits = [torch.randn(30, 8) * 2 for _ in range(3)]
    for k in (1, 2, 3):
        expected = load_balancing_loss_func(tuple(logits), 8, k)
        torch.testing.assert_close(load_balancing_loss(logits, k), expected, atol=1e-6, rtol=0)
    mask = torch.ones(3, 10)
    mask[0, :4] = 0
    mask[2, 7:] = 0
    expected = load_balancing_loss_func(tuple(logits), 8, 2, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(logits, 2, mask), expected, atol=1e-6, rtol=0)


def test_aux_loss_equals_transformers_router_aux_loss_on_the_same_model(tmp_path):
    """The router logits our forward keeps give transformers' own `aux_loss` of the same weights."""
    theirs = _random_hf(_mixtral(num_local_experts=8))
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).train()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        expected = theirs(ids, output_router_logits=True).aux_loss
        ours(ids)
    logits = router_logits(ours)
    assert len(logits) == 2 and logits[0].shape == (len(IDS[0]), 8)
    torch.testing.assert_close(load_balancing_loss(logits, 2), expected, atol=1e-6, rtol=0)


def test_balanced_router_scores_k_and_z_loss_by_hand():
    # Four tokens, each a one-hot preference for a different expert of 4, top-1: f_e = 1/4 each;
    # P_e = (e^2 + 3) / (4 (e^2 + 3)) = 1/4 each, so E * sum f P = 4 * 4 * 1/16 = 1 = k.
    logits = torch.eye(4) * 2.0
    assert abs(load_balancing_loss([logits], 1).item() - 1.0) < 1e-6
    # All tokens to expert 0 (top-1): f_0 = 1, P_0 = e^2 / (e^2 + 3); loss = 4 P_0.
    skewed = torch.zeros(4, 4)
    skewed[:, 0] = 2.0
    p0 = torch.e ** 2 / (torch.e ** 2 + 3)
    assert abs(load_balancing_loss([skewed], 1).item() - 4 * p0) < 1e-6
    # z-loss: logsumexp of a row (2, 0, 0, 0) is log(e^2 + 3); mean of its square over tokens and layers.
    z = torch.log(torch.tensor(torch.e ** 2 + 3)) ** 2
    assert abs(router_z_loss([logits, skewed]).item() - z.item()) < 1e-5
    assert expert_load(skewed, 1).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert expert_load(logits, 1).tolist() == [0.25] * 4


def test_objective_adds_the_router_losses_with_the_config_coefficients():
    model = _random_ours(_tiny(router_aux_loss_coef=0.3, router_z_loss_coef=0.05)).train()
    x = torch.randint(0, 320, (2, 12))
    loss, metrics = causal_lm_loss(model, (x, x))
    logits = router_logits(model)
    per_layer = torch.stack([load_balancing_loss_func((layer,), 4, 2) for layer in logits]).mean()
    expected = metrics["lm_loss"] + 0.3 * per_layer + 0.05 * router_z_loss(logits)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    assert metrics["aux_loss"] > 0 and metrics["z_loss"] > 0
    for layer in range(2):
        loads = [metrics[f"expert_load.{layer}.{e}"].item() for e in range(4)]
        assert abs(sum(loads) - 1) < 1e-6
    loss.backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    padded = {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
    padded["attention_mask"][0, :5] = 0  # left padding: its tokens are routed but count in no router loss
    _, masked = causal_lm_loss(model, padded)
    mask_logits = router_logits(model)
    torch.testing.assert_close(masked["aux_loss"], load_balancing_loss(mask_logits, 2, padded["attention_mask"],
                                                                       per_layer=True), atol=1e-6, rtol=0)
    assert abs(sum(masked[f"expert_load.0.{e}"].item() for e in range(4)) - 1) < 1e-6
    model.eval()  # evaluation: the LM loss alone, no router logits kept
    loss, metrics = causal_lm_loss(model, (x, x))
    assert "aux_loss" not in metrics and router_logits(model) == []
    glob = _random_ours(_tiny(router_aux_loss_coef=0.3, router_z_loss_coef=0.05, router_balance="global")).train()
    _, metrics = causal_lm_loss(glob, (x, x))
    torch.testing.assert_close(metrics["aux_loss"], load_balancing_loss_func(tuple(router_logits(glob)), 4, 2),
                               atol=1e-6, rtol=0)


def test_per_layer_balance_sees_what_pooling_the_layers_hides():
    """Layer 0 sends every token to expert 0, layer 1 to expert 1 (top-1 of 2): pooled over both layers
    each expert gets half the tokens, so transformers' loss reads nearly balanced; each layer alone is
    fully skewed, and the per-layer loss says so."""
    a = torch.tensor([[4.0, 0.0]]).repeat(6, 1)
    b = a.flip(-1)
    p = torch.e ** 4 / (torch.e ** 4 + 1)  # the favoured expert's probability
    # Pooled: f_e = 1/2 and P_e = (p + 1 - p) / 2 = 1/2 for both experts, so E * sum f P = 1 = k, "balanced".
    assert abs(load_balancing_loss([a, b], 1).item() - 1.0) < 1e-6
    assert abs(load_balancing_loss([a, b], 1, per_layer=True).item() - 2 * p) < 1e-5  # 2 P: skewed


# ---- dispatch and decoding ---------------------------------------------------------------------


def test_grouped_gathered_and_dense_dispatch_agree():
    model = _random_ours(_tiny(n_experts=5, experts_per_token=2, shared_expert_d_ff=24))
    moe = model.blocks[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(40, 64)
    _, weights, _ = moe.route(x)
    experts = torch.stack([torch.randperm(4)[:2] for _ in range(40)])  # expert 4 gets no token: still exact
    grouped = moe._grouped(x, weights, experts)
    reference = sum(weights[:, j, None] * torch.stack([moe._expert(x[i:i + 1], int(experts[i, j]))[0]
                                                       for i in range(40)]) for j in range(2))
    for y in (grouped, moe._gathered(x, weights, experts), moe._dense(x, weights, experts)):
        torch.testing.assert_close(y, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shared", [0, 24])
def test_kv_cached_decoding_equals_the_full_forward(shared):
    model = _random_ours(_tiny(n_experts=4, experts_per_token=2, shared_expert_d_ff=shared, qkv_bias=bool(shared)))
    ids = torch.randint(0, 320, (3, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 3, 32)
        steps = [model(ids[:, :5], kv_cache=cache)]  # prefill: grouped; 3 rows x 2 experts > 4: grouped too
        steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(5, 12)]
        one = KVCache(model.config, 1, 32)  # one row: 1 x 2 <= 4 experts, the gathered path
        single = [model(ids[:1, :5], kv_cache=one)] + [model(ids[:1, t:t + 1], kv_cache=one) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(single, 1), full[:1], atol=1e-5, rtol=0)


def test_compiled_fixed_shape_decode_step_equals_the_full_forward():
    """`decode_step` through dynamo in one graph (fullgraph: no break on the routing) runs the dense path."""
    model = _random_ours(_tiny())
    ids = torch.randint(0, 320, (2, 8))
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 16)
        out = []
        for t in range(8):
            cache.valid[:, t] = True
            out.append(step(ids[:, t:t + 1], torch.full((2, 1), t), torch.tensor(t), cache.valid.clone(), cache))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_flops_count_the_active_experts_only():
    moe = Transformer(_tiny(n_experts=8, experts_per_token=2))
    dense = Transformer(_tiny(n_experts=0, d_ff=96))  # two experts of 48 = one MLP of 96
    router = 2 * 2 * 64 * 8  # 2 FLOPs per weight, 2 layers of a 64 x 8 router
    assert moe.flops_per_token(64, training=False) == dense.flops_per_token(64, training=False) + router


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    (dict(experts_per_token=5), "experts_per_token=5 with n_experts=4"),
    (dict(experts_per_token=0), "experts_per_token=0 with n_experts=4"),
    (dict(n_experts=-1), "n_experts must be an integer >= 0"),
    (dict(n_experts=0, shared_expert_d_ff=32), "shared_expert_d_ff=32 needs n_experts > 0"),
    (dict(gated_mlp=False), "needs gated_mlp=True"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef must be >= 0"),
])
def test_bad_moe_configs_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(**changes)


def test_memory_estimate_refuses_experts():
    with pytest.raises(ConfigError, match="does not model mixture-of-experts"):
        training_memory(_tiny())


def test_configs_no_transformers_family_computes_are_refused():
    no_shared = _tiny(moe_renormalize=False)  # OLMoE-style routing without qkv biases or a shared expert
    with pytest.raises(ConfigError, match="mixtral needs moe_renormalize=True"):
        no_shared.to_hf_config()


@pytest.mark.parametrize("make, key, value, message", [
    (_mixtral, "router_jitter_noise", 0.1, "router_jitter_noise=0.1 is not supported"),
    (_qwen2_moe, "mlp_only_layers", [1], r"layers \[1\] are dense MLPs"),
    (_qwen2_moe, "decoder_sparse_step", 2, r"layers \[0\] are dense MLPs"),
])
def test_hf_configs_llmkit_cannot_compute_are_refused(make, key, value, message, tmp_path):
    _random_hf(make()).save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(FormatError, match=message):
        Transformer.from_pretrained(tmp_path)


def test_mixtral_2m_has_llama_2m_active_parameters():
    dense = Transformer(ModelConfig.from_preset("llama-2m"))
    moe = Transformer(ModelConfig.from_preset("mixtral-2m"))
    c = moe.config
    inactive = 4 * (8 - 2) * 3 * 128 * 192  # six idle experts of 3 x 128 x 192 in each of 4 layers
    routers = c.n_layer * c.d_model * c.n_experts
    assert inactive_parameters(c) == inactive
    assert moe.num_parameters() - inactive == dense.num_parameters() + routers
    assert model_summary("mixtral-2m")["active_parameters"] == dense.num_parameters() + routers
    assert moe.flops_per_token(256) == dense.flops_per_token(256) + 3 * 2 * routers


def test_generate_batched_greedy_equals_full_forward_argmax():
    """The engine (left-padded batch, cached decode: grouped and gathered dispatch) on a MoE model picks
    what a full forward of each growing sequence picks."""
    from llmkit.generate import generate

    model = _random_ours(_tiny(n_experts=4, experts_per_token=2))
    with torch.no_grad():
        model.embed.weight.mul_(10)  # decisive argmax: no near-ties for float noise to flip
    prompts = [[5, 17, 250, 3, 99], [42, 7]]
    outs = generate(model, None, prompts, max_new_tokens=8, temperature=0.0)
    for prompt, out in zip(prompts, outs, strict=True):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out.token_ids == seq[len(prompt):]


def test_int8_quantized_moe_keeps_routers_exact_and_stays_close():
    """quantize() packs attention, the shared expert and the head; routers stay float (as llama.cpp keeps
    ffn_gate_inp F32) so int8 noise does not re-route tokens; the stacked experts stay float too. The
    error is bounded by what the same quantization does to a dense model of the same widths (measured
    0.053 for this MoE against 0.090 for the dense one; packed kernels return bf16 logits)."""
    from llmkit.quant.linear import quantize

    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    errors = {}
    for config in (_tiny(shared_expert_d_ff=32, qkv_bias=True, moe_renormalize=False), _tiny(n_experts=0, d_ff=96)):
        model = _random_ours(config)
        with torch.no_grad():
            before = model(ids)
            quantize(model, bits=8, int8_prefill=False)
            errors[config.n_experts] = float((model(ids) - before).abs().max())
    assert 0 < errors[4] < 1.5 * errors[0]


def test_quantize_leaves_routers_and_experts_in_float():
    from llmkit.quant.linear import quantize

    model = quantize(_random_ours(_tiny(shared_expert_d_ff=32, qkv_bias=True, moe_renormalize=False)), bits=8)
    moe = model.blocks[0].mlp
    assert type(moe.router) is torch.nn.Linear and type(moe.shared_expert_gate) is torch.nn.Linear
    assert type(moe.shared_expert.down_proj).__name__ == "PackedLinear" and moe.gate_proj.dtype == torch.float32


def test_compiled_training_forward_keeps_the_router_losses():
    """The loop's `compile: true`: through dynamo the MoE takes the dense path and still leaves its router
    logits for the objective; loss and aux loss equal the eager ones."""
    model = _random_ours(_tiny()).train()
    x = torch.randint(0, 320, (2, 12))
    eager, eager_metrics = causal_lm_loss(model, (x, x))
    compiled, metrics = causal_lm_loss(torch.compile(model, backend="eager"), (x, x))
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["aux_loss"], eager_metrics["aux_loss"], atol=1e-6, rtol=0)
    compiled.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0
