"""GPTQ for int4: the error-compensating update by hand, round-to-nearest when inputs are uncorrelated,
a lower layer-output error than round-to-nearest on correlated calibration activations, and the packed
int4 layer computing exactly the weights GPTQ chose."""

import pytest
import torch

from llmkit import ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.quant import PackedLinear, quantize
from llmkit.quant.calibrate import calibrate
from llmkit.quant.gptq import gptq_int4
from llmkit.quant.weights import quantize_int4


def test_the_second_column_absorbs_the_first_columns_error_by_hand():
    # One group of two inputs. OBS: after rounding column 0 (error e0 = w0 - dq0), the best change to the
    # unquantized column 1 under the output error d^T H d is -H10/H11 * (dq0 - w0) = (b / c) * e0,
    # with H = [[a, b], [b, c]] damped by 1 % of its mean diagonal.
    w = torch.tensor([[0.30, -0.50], [1.00, 0.20], [-0.70, 0.90]])
    a, b, c = 4.0, 1.5, 2.0
    gram = torch.tensor([[a, b], [b, c]])
    lam = 0.01 * (a + c) / 2
    q, scale, zero, dq = gptq_int4(w, gram, group_size=2, block=2)
    lo = w.double().amin(1)
    s = (w.double().amax(1) - lo) / 15
    q0 = torch.round((w[:, 0].double() - lo) / s)
    e0 = w[:, 0].double() - (q0 * s + lo)
    w1 = w[:, 1].double() + b / (c + lam) * e0
    q1 = torch.round((w1 - lo) / s).clamp(0, 15)
    assert q[:, 0].tolist() == q0.int().tolist() and q[:, 1].tolist() == q1.int().tolist()
    torch.testing.assert_close(dq, ((torch.stack([q0, q1], 1) - 8) * s[:, None] + lo[:, None] + 8 * s[:, None]).float())


def test_uncorrelated_inputs_give_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, scale, zero, dq = gptq_int4(w, 3.0 * torch.eye(64), group_size=32)  # H ∝ I: nothing to compensate
    q_rtn, scale_rtn, zero_rtn, dq_rtn = quantize_int4(w, 32)
    assert torch.equal(q, q_rtn)
    torch.testing.assert_close(dq, dq_rtn, rtol=0, atol=1e-6)  # the same grid in float64 vs float32


def test_gptq_lowers_the_layer_output_error_on_correlated_activations():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    x = torch.randn(512, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(512, 128)  # strongly correlated inputs
    dq = gptq_int4(w, x.T @ x, group_size=32)[3]
    dq_rtn = quantize_int4(w, 32)[3]
    err, err_rtn = ((x @ (w - dq).T) ** 2).sum(), ((x @ (w - dq_rtn).T) ** 2).sum()
    assert err < 0.5 * err_rtn, (float(err), float(err_rtn))  # measured 0.07x here


@torch.no_grad()
def test_the_packed_layer_computes_the_gptq_weights_and_quantize_uses_them():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny")).eval()
    batches = [torch.randint(0, 512, (2, 32)) for _ in range(2)]
    stats = calibrate(model, batches, gram=True)
    lin = model.blocks[0].mlp.down_proj
    chosen = gptq_int4(lin.weight, stats.gram["blocks.0.mlp.down_proj"], 32)
    x = torch.randn(4, lin.in_features)
    packed = PackedLinear(lin, bits=4, int4=chosen)
    reference = x @ chosen[3].T
    # bf16 activations in the packed kernel: ~3 significant digits of the output scale
    torch.testing.assert_close(packed(x), reference, rtol=0, atol=1e-2 * float(reference.abs().max()))
    quantize(model, bits=4, calibration=stats)
    assert torch.equal(model.blocks[0].mlp.down_proj.packed, packed.packed)
    with pytest.raises(ConfigError, match="GPTQ .* applies to bits=4"):
        quantize(Transformer(ModelConfig.from_preset("llama-tiny")), bits=8, calibration=stats)


def test_shapes_gptq_cannot_take_are_refused():
    with pytest.raises(ConfigError, match=r"GPTQ needs in_features \(48\)"):
        gptq_int4(torch.randn(4, 48), torch.eye(48), group_size=32)
    with pytest.raises(ConfigError, match=r"Gram matrix of shape \(3, 3\); expected \(64, 64\)"):
        gptq_int4(torch.randn(4, 64), torch.eye(3))
