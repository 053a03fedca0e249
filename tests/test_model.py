"""The Transformer is the same network transformers runs: logits parity in both directions,
for both families, plus the KV-cache invariants and parameter counts."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmkit import KVCache, ModelConfig, Transformer
from llmkit.generate.engine import left_pad

ATOL = 1e-5  # fp32 logits


def hf_llama(tie=False, rope_scaling=None, bias=False):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                         attention_bias=bias, mlp_bias=bias)
    if rope_scaling:
        config.rope_parameters = {"rope_type": "linear", "rope_theta": 5000.0, "factor": rope_scaling}
    return LlamaForCausalLM(config).eval()


def hf_gpt2():
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tokens(batch=2, seq=23, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_norms(model):
    """Random init leaves norm gains at 1 and biases at 0; perturb them so a swapped name shows."""
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("make", [hf_llama, lambda: hf_llama(tie=True), lambda: hf_llama(rope_scaling=4.0),
                                  lambda: hf_llama(bias=True), hf_gpt2],
                         ids=["llama-gqa-untied", "llama-tied", "llama-linear-rope", "llama-bias", "gpt2"])
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, make):
    hf = randomize_norms(make())
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize("preset_overrides", [
    dict(n_layer=2, n_head=8, n_kv_head=2, d_model=64, d_ff=160, vocab_size=256, tie_embeddings=False),
    dict(n_layer=2, n_head=4, n_kv_head=4, d_model=64, d_ff=128, vocab_size=256, tie_embeddings=True,
         rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["llama-gqa-untied", "llama-tied-scaled"])
def test_llmkit_llama_checkpoint_loads_in_transformers(tmp_path, preset_overrides):
    ours = randomize_norms(Transformer(ModelConfig.from_preset("llama-tiny", **preset_overrides)).eval())
    ours.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=ATOL)


def test_llmkit_gpt2_checkpoint_loads_in_transformers(tmp_path):
    config = ModelConfig.from_preset("gpt2", n_layer=2, n_head=4, d_model=64, vocab_size=256, max_seq_len=128)
    ours = randomize_norms(Transformer(config).eval())
    ours.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=ATOL)


def test_sharded_and_half_precision_checkpoints(tmp_path):
    hf = randomize_norms(hf_llama())
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path / "sharded")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=ATOL)

    # Our own sharded writer, read back by transformers.
    ours.save_pretrained(tmp_path / "ours-sharded", max_shard_size=60_000)
    assert len(list((tmp_path / "ours-sharded").glob("model-*-of-*.safetensors"))) > 1
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ours-sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, ours(x), rtol=0, atol=ATOL)

    for dtype in (torch.bfloat16, torch.float16):
        ours.save_pretrained(tmp_path / str(dtype), dtype=dtype)
        half = Transformer.from_pretrained(tmp_path / str(dtype))
        assert half.dtype == dtype
        expected = {k: v.to(dtype) for k, v in ours.state_dict().items()}
        for k, v in half.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


# ---- KV cache ---------------------------------------------------------------------------------


# Each family's own features on the llama-tiny shape; Gemma-3's window (4) is shorter than the sequences.
FAMILIES = {
    "llama": {},
    "qwen2": dict(qkv_bias=True, rope_theta=1e6),
    "gemma3": dict(activation="gelu_tanh", norm_offset=1.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
                   attn_scale=0.2, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   rope_theta=1e6, rope_local_theta=1e4),
}


def tiny(family):
    if family in FAMILIES:
        config = ModelConfig.from_preset("llama-tiny", n_head=8, n_kv_head=2, **FAMILIES[family])
    else:
        config = ModelConfig.from_preset("gpt2", n_layer=2, n_head=4, d_model=64, vocab_size=512, max_seq_len=256)
    return randomize_norms(Transformer(config).eval())


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_prefill_then_decode_equals_full_forward(family):
    model = tiny(family)
    x = tokens(batch=2, seq=24, vocab=512)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, batch_size=2, max_len=64)
        steps = [model(x[:, :8], kv_cache=cache)]
        for t in range(8, 24):  # 16 decode steps
            steps.append(model(x[:, t:t + 1], kv_cache=cache))
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_left_padded_batch_equals_each_prompt_alone(family):
    model = tiny(family)
    prompts = [tokens(1, n, 512, seed=n)[0] for n in (5, 11, 8)]
    batch, mask = left_pad([p.tolist() for p in prompts], 0, "cpu")
    width = batch.shape[1]
    decode = tokens(3, 6, 512, seed=99)  # the same continuation fed to every row

    with torch.no_grad():
        cache = KVCache(model.config, batch_size=3, max_len=32)
        prefill = model(batch, attention_mask=mask, kv_cache=cache)
        steps = [model(decode[:, t:t + 1], kv_cache=cache) for t in range(decode.shape[1])]
        uncached = model(torch.cat([batch, decode], 1), attention_mask=torch.cat([mask, torch.ones_like(decode)], 1))
        for i, p in enumerate(prompts):
            alone = model(torch.cat([p, decode[i]])[None])
            n = len(p)
            torch.testing.assert_close(prefill[i, width - n:], alone[0, :n], rtol=0, atol=ATOL)
            decoded = torch.cat([s[i] for s in steps])
            torch.testing.assert_close(decoded, alone[0, n:], rtol=0, atol=ATOL)
            torch.testing.assert_close(uncached[i, width - n:], alone[0], rtol=0, atol=ATOL)


def test_left_padded_batch_matches_transformers(tmp_path):
    hf = randomize_norms(hf_llama())
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    x = tokens(3, 10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        expected = hf(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=ATOL)


def test_cache_overflow_is_a_clear_error():
    model = tiny("llama")
    cache = KVCache(model.config, batch_size=1, max_len=8)
    with torch.no_grad():
        model(tokens(1, 6, 512), kv_cache=cache)
        with pytest.raises(ValueError, match=r"9 tokens \(6 cached \+ 3 new\) exceeds the KV cache of 8"):
            model(tokens(1, 3, 512), kv_cache=cache)


# ---- accounting -------------------------------------------------------------------------------


def test_parameter_counts_match_transformers():
    assert Transformer(ModelConfig.from_preset("gpt2")).num_parameters() == 124_439_808
    for hf in (hf_llama(), hf_llama(tie=True), hf_llama(bias=True), hf_gpt2()):
        ours = Transformer(ModelConfig.from_hf_config(hf.config.to_dict()))
        assert ours.num_parameters() == hf.num_parameters()
        assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)


def test_flops_per_token_follows_6n_plus_attention():
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    c = model.config
    matmul_weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight")
    attention = 4 * c.n_layer * 128 * c.n_head * c.head_dim
    assert model.flops_per_token(128, training=False) == 2 * matmul_weights + attention
    assert model.flops_per_token(128) == 3 * (2 * matmul_weights + attention)
