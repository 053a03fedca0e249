"""Weight-only int8/int4 layers: the packed kernels compute the quantized weight they claim, prefill
and decode use the same function, and a quantized model generates with a consistent cache."""

import pytest
import torch
import torch.nn as nn

import llmkit
from llmkit import KVCache, ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.generate import engine
from llmkit.generate.fast import SMALL_BATCH, PackedLinear, quantize


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_kernel_and_bf16_path_compute_the_same_quantized_weight(bits):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    q = PackedLinear(lin, bits=bits, group_size=32)
    x = torch.randn(3 * SMALL_BATCH, 128)
    with torch.no_grad():
        reference = x @ q.weight_bf16.float().T + lin.bias
    small = torch.cat([q(x[i:i + 4]) for i in range(0, len(x), 4)])  # packed kernel
    large = q(x)  # bf16 GEMM
    scale = float(reference.abs().max())
    torch.testing.assert_close(small, reference, rtol=0, atol=2e-2 * scale)
    torch.testing.assert_close(large, reference, rtol=0, atol=2e-2 * scale)
    # and the quantized weight is close to the original, closer with 8 bits than with 4
    err = (q.weight_bf16.float() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < (0.01 if bits == 8 else 0.1)


def test_int4_rejects_shapes_its_kernel_cannot_pack():
    with pytest.raises(ConfigError, match="group_size"):
        PackedLinear(nn.Linear(100, 64), bits=4, group_size=32)
    with pytest.raises(ConfigError, match="bits"):
        PackedLinear(nn.Linear(64, 64), bits=3)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_decodes_consistently_with_its_prefill(bits):
    torch.manual_seed(0)
    model = quantize(Transformer(ModelConfig.from_preset("llama-tiny", max_seq_len=128)).eval(), bits=bits)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2 * 7 + 1
    ids = torch.randint(0, 512, (1, 48))
    cache = KVCache(model.config, 1, 48)
    step = engine.DecodeStep(model)
    with torch.no_grad():
        full = model(ids)  # 48 rows: the bf16 GEMM path
        model(ids[:, :SMALL_BATCH + 8], kv_cache=cache)
        for t in range(SMALL_BATCH + 8, 48):
            logits = step(ids[:, t], cache)  # one row: the packed kernel
            torch.testing.assert_close(logits, full[0, t][None], rtol=0, atol=5e-2 * float(full.abs().max()))
    out = llmkit.generate(model, None, [1, 2, 3], max_new_tokens=8, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 8
