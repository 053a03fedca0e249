"""The importance matrix: llama.cpp's per-channel mean squared activations, by hand; its file; and
`export --imatrix`, whose all-ones matrix writes the plain file byte for byte."""

import numpy as np
import pytest
import torch
from gguf_helpers import tiny_model

from llmkit import commands
from llmkit.errors import ConfigError, FormatError
from llmkit.quant import imatrix


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(d_model=256, d_ff=512)


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 400, (1, 32), generator=g) for _ in range(3)]


@torch.no_grad()
def test_the_matrix_is_each_input_channels_mean_square_by_hand(tiny):
    model, _ = tiny
    matrix, meta = imatrix.compute(model, batches())
    assert meta["tokens"] == "96" and meta["chunks"] == "3"
    assert set(matrix) == {f"blk.{i}.{t}.weight" for i in range(2) for t in
                           ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | {"output.weight"}
    # by hand: the first block's attention reads attn_norm(embeddings); its MLP's down_proj reads act(gate) * up
    x = torch.cat([model.embed(b)[0] for b in batches()])
    h = model.blocks[0].attn_norm(x)
    np.testing.assert_allclose(matrix["blk.0.attn_q.weight"], (h * h).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_array_equal(matrix["blk.0.attn_q.weight"], matrix["blk.0.attn_v.weight"])
    assert matrix["blk.1.ffn_down.weight"].shape == (512,)


def test_file_round_trip_and_bad_files(tiny, tmp_path):
    model, _ = tiny
    matrix, meta = imatrix.compute(model, batches())
    imatrix.save(tmp_path / "m.safetensors", matrix, meta)
    back = imatrix.load(tmp_path / "m.safetensors")
    assert set(back) == set(matrix)
    for k in matrix:
        np.testing.assert_array_equal(back[k], matrix[k])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(FormatError, match="junk.safetensors: not a readable safetensors importance matrix"):
        imatrix.load(tmp_path / "junk.safetensors")
    imatrix.save(tmp_path / "other.safetensors", matrix, {"format": "something-else"})
    with pytest.raises(FormatError, match="metadata format 'something-else'; expected 'llmkit-imatrix'"):
        imatrix.load(tmp_path / "other.safetensors")


def test_export_with_an_imatrix(tiny, tmp_path):
    model, tok = tiny
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    matrix, meta = imatrix.compute(model, batches())
    ones = {k: np.ones_like(v) for k, v in matrix.items()}
    imatrix.save(tmp_path / "ones.safetensors", ones, meta)
    imatrix.save(tmp_path / "real.safetensors", matrix, meta)
    for quant in ("Q4_0", "Q3_K_M"):
        commands.export(str(folder), str(tmp_path / "plain.gguf"), quant=quant)
        commands.export(str(folder), str(tmp_path / "ones.gguf"), quant=quant, imatrix=str(tmp_path / "ones.safetensors"))
        commands.export(str(folder), str(tmp_path / "real.gguf"), quant=quant, imatrix=str(tmp_path / "real.safetensors"))
        plain = (tmp_path / "plain.gguf").read_bytes()
        assert (tmp_path / "ones.gguf").read_bytes() == plain, quant  # all-ones: the plain file, byte for byte
        assert (tmp_path / "real.gguf").read_bytes() != plain, quant
    imatrix.save(tmp_path / "alien.safetensors", {"blk.9.attn_q.weight": np.ones(256, np.float32)}, meta)
    with pytest.raises(ConfigError, match="the importance matrix has tensors this model lacks: blk.9.attn_q.weight"):
        commands.export(str(folder), str(tmp_path / "x.gguf"), quant="Q4_0", imatrix=str(tmp_path / "alien.safetensors"))


# ---- the int4 kernels' grids ----------------------------------------------------------------------------


def test_int4_grids_weighted_by_importance():
    """quantize_int4 with an importance vector: uniform (all ones, or all 3.0) gives the plain min/max grids
    bit for bit; a skewed one never raises any group's weighted error over min/max's and lowers the total
    by a fifth or more; the columns that matter most get the largest share of that gain."""
    from llmkit.quant.weights import quantize_int4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g, dtype=torch.float64)
    plain = quantize_int4(w, 32)
    for uniform in (torch.ones(256), torch.full((256,), 3.0)):
        assert all(torch.equal(a, b) for a, b in zip(plain, quantize_int4(w, 32, uniform), strict=True))
    imp = torch.rand(256, generator=g, dtype=torch.float64) ** 4 * 10
    q, scale, zero, dequant = quantize_int4(w, 32, imp)
    per_group = lambda d: (imp * (d - w) ** 2).view(64, 8, 32).sum(-1)  # noqa: E731
    ours, theirs = per_group(dequant), per_group(plain[3])
    assert bool((ours <= theirs + 1e-12).all()) and ours.sum() < 0.8 * theirs.sum()
    assert torch.equal(dequant, ((q.double() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1)))
    top = imp > imp.quantile(0.9)  # the tenth of the columns with the largest importance
    gain = ((plain[3] - w) ** 2 - (dequant - w) ** 2).sum(0)
    assert gain[top].mean() > 2 * gain[~top].mean()
    with pytest.raises(ValueError, match="one per input column"):
        quantize_int4(w, 32, torch.ones(255))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_int4(w, 32, -torch.ones(256))


def test_quantize_takes_an_importance_matrix_for_int4(tiny):
    """`quantize(model, bits=4, importance=calibration)` builds each layer's grids from its input's mean
    squared activations (a fused layer's from the input its parts share): the packed layers hold exactly
    quantize_int4(w, g, mean_sq) of each part; GPTQ's calibration and the importance together are refused."""
    from llmkit import Transformer
    from llmkit.quant import quantize
    from llmkit.quant.calibrate import calibrate
    from llmkit.quant.weights import quantize_int4

    model = Transformer(tiny[0].config).eval()
    model.load_state_dict(tiny[0].state_dict())
    stats = calibrate(model, batches())
    q_proj, v_proj = model.blocks[0].attn.q_proj.weight.detach().clone(), model.blocks[0].attn.v_proj.weight.detach().clone()
    down = model.blocks[1].mlp.down_proj.weight.detach().clone()
    quantize(model, bits=4, group_size=32, importance=stats, int8_prefill=False)
    fused = model.blocks[0].attn.qkv_proj.weight_dequantized
    imp = stats.mean_sq("blocks.0.attn.q_proj").float()
    assert torch.equal(fused[:q_proj.shape[0]], quantize_int4(q_proj, 32, imp)[3])
    assert torch.equal(fused[-v_proj.shape[0]:], quantize_int4(v_proj, 32, imp)[3])
    assert not torch.equal(fused[:q_proj.shape[0]], quantize_int4(q_proj, 32)[3])
    assert torch.equal(model.blocks[1].mlp.down_proj.weight_dequantized,
                       quantize_int4(down, 32, stats.mean_sq("blocks.1.mlp.down_proj").float())[3])
    with pytest.raises(ConfigError, match="one of the two"):
        fresh = Transformer(tiny[0].config)
        quantize(fresh, bits=4, calibration=calibrate(fresh, batches(), gram=True), importance=stats)
