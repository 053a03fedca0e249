"""Our K-quant (and IQ4_NL) quantizers against the gguf package's dequantizers, bit for bit, and
llama.cpp's per-tensor recipes."""

import gguf
import numpy as np
import pytest

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.formats import gguf_quants
from llmkit.formats.gguf_quants import QUANTIZERS, plan_types, quantize

# Bits per weight of each block format, and the relative RMS error a sane quantizer stays under on
# Gaussian weights (measured: Q3_K 0.15, Q4_K and IQ4_NL 0.07, Q5_K 0.036, Q6_K 0.018).
BPW = {"Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "IQ4_NL": 4.5}
MAX_REL_RMSE = {"Q3_K": 0.2, "Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.025, "IQ4_NL": 0.09}


def _weights(rows=48, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    x[0] = 0.0  # an all-zero row must not divide by zero
    x[1, :256] = 1e-3  # a constant block
    x[2, 7] = 3.0  # an outlier
    return x


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_packing_is_bit_exact_against_the_gguf_dequantizer(name):
    x = _weights()
    packed, expected = QUANTIZERS[name](x)
    qtype = gguf.GGMLQuantizationType[name]
    assert packed.dtype == np.uint8
    assert packed.shape == (x.shape[0], gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)[-1])
    decoded = gguf.quants.dequantize(packed, qtype)
    np.testing.assert_array_equal(decoded, expected)  # bit for bit: same bytes, same float32 arithmetic
    assert packed.nbytes * 8 / x.size == BPW[name]


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantization_error_is_small(name):
    x = _weights(seed=1)[3:]
    _, decoded = QUANTIZERS[name](x)
    rel = np.sqrt(((decoded - x) ** 2).mean() / (x**2).mean())
    assert rel < MAX_REL_RMSE[name], rel
    assert np.all(np.isfinite(decoded))


def test_zero_rows_decode_to_zero():
    x = np.zeros((2, 256), dtype=np.float32)
    for name in QUANTIZERS:
        _, decoded = QUANTIZERS[name](x)
        assert not decoded.any(), name


def test_more_bits_means_less_error():
    x = _weights(seed=2)[3:]
    err = {n: float(((QUANTIZERS[n](x)[1] - x) ** 2).mean()) for n in ("Q3_K", "Q4_K", "Q5_K", "Q6_K")}
    assert err["Q3_K"] > err["Q4_K"] > err["Q5_K"] > err["Q6_K"]


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "BF16"])
def test_package_quantizers_are_used_for_the_rest(name):
    x = _weights()
    np.testing.assert_array_equal(quantize(x, name), gguf.quants.quantize(x, gguf.GGMLQuantizationType[name]))


def test_rows_not_divisible_by_the_block_are_refused():
    with pytest.raises(ConfigError, match="blocks of 256"):
        QUANTIZERS["Q4_K"](np.zeros((2, 300), dtype=np.float32))


# ---- recipes (llama.cpp's llama_tensor_get_type) ----------------------------------------------

SMOL = ModelConfig.from_preset("smollm2-135m")  # rows of 576: not a multiple of 256 except ffn_down's 1536
WIDE = ModelConfig(vocab_size=1000, n_layer=16, n_head=8, n_kv_head=4, d_model=512, d_ff=1024)


def test_smollm2_q4_k_m_recipe():
    plan = plan_types(SMOL, "Q4_K_M")
    assert plan["token_embd.weight"] == "Q8_0"  # tied output, 576 % 256 != 0
    assert plan["blk.0.attn_norm.weight"] == "F32"
    assert plan["blk.5.attn_q.weight"] == "Q5_0"  # Q4_K falls back to Q5_0 on rows of 576
    more = {i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2}
    for i in range(30):
        assert plan[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert plan[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more else "Q5_0")  # Q6_K -> Q8_0 fallback


def test_q3_k_m_recipe():
    plan = plan_types(WIDE, "Q3_K_M")
    assert plan["output.weight"] == "Q6_K" and plan["token_embd.weight"] == "Q3_K"
    assert [plan[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert plan["blk.0.ffn_down.weight"] == "Q5_K" and plan["blk.1.ffn_down.weight"] == "Q4_K"
    assert plan["blk.3.attn_output.weight"] == "Q4_K"
    assert plan["blk.3.attn_q.weight"] == plan["blk.3.ffn_up.weight"] == "Q3_K"
    assert plan_types(SMOL, "Q3_K_M")["blk.3.attn_q.weight"] == "IQ4_NL"  # llama.cpp's Q3_K fallback


def test_q5_k_m_and_plain_recipes():
    plan = plan_types(WIDE, "Q5_K_M")
    assert plan["blk.0.ffn_down.weight"] == "Q6_K" and plan["blk.3.ffn_down.weight"] == "Q5_K"
    assert plan["blk.3.attn_k.weight"] == "Q5_K"
    q8 = plan_types(WIDE, "Q8_0")
    assert set(q8.values()) == {"Q8_0", "F32"}
    q4 = plan_types(WIDE, "Q4_0")
    assert q4["output.weight"] == "Q6_K" and q4["blk.0.attn_q.weight"] == "Q4_0"
    assert set(plan_types(WIDE, "BF16").values()) == {"BF16", "F32"}


def test_unknown_file_type():
    with pytest.raises(ConfigError, match="Q2_K"):
        plan_types(WIDE, "Q2_K")
    assert set(gguf_quants.FILE_TYPES) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M", "Q3_K_M", "Q5_K_M"}


# ---- importance-weighted quantization (llama.cpp's imatrix) -----------------------------------

WEIGHTED_TYPES = ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q5_0", "Q8_0", "Q4_1"]


@pytest.mark.parametrize("name", WEIGHTED_TYPES)
def test_an_all_ones_importance_gives_the_plain_bytes(name):
    x = _weights(rows=8)
    np.testing.assert_array_equal(quantize(x, name, np.ones(x.shape[1], dtype=np.float32)), quantize(x, name))


def _weighted_error(x, name, importance, with_importance=True):
    qtype = gguf.GGMLQuantizationType[name]
    packed = quantize(x, name, importance if with_importance else None)
    decoded = gguf.quants.dequantize(packed, qtype)  # what a reader decodes
    return float((importance * (decoded - x) ** 2).sum())


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q3_K", "Q4_K", "IQ4_NL"])
def test_a_non_uniform_importance_lowers_the_weighted_error(name):
    x = _weights(rows=16, seed=3)[3:]
    rng = np.random.default_rng(4)
    importance = np.exp(2.0 * rng.standard_normal(x.shape[1])).astype(np.float32)  # a few channels dominate
    plain = _weighted_error(x, name, importance, with_importance=False)
    weighted = _weighted_error(x, name, importance)
    assert weighted < 0.95 * plain, (weighted, plain)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_weighted_q_0_packing_is_bit_exact_against_the_gguf_dequantizer(name):
    x = _weights(rows=8)
    importance = np.linspace(0.1, 3.0, x.shape[1], dtype=np.float32)
    packed, expected = gguf_quants._WEIGHTED_ONLY[name](x, importance)
    np.testing.assert_array_equal(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name]), expected)


def test_importance_of_the_wrong_shape_is_refused():
    with pytest.raises(ConfigError, match=r"importance of shape \(3,\); expected 512 finite non-negative"):
        quantize(_weights(rows=4), "Q4_0", np.ones(3))
