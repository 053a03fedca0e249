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
