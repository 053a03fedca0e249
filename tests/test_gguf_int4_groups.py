"""A GGUF file's 4-bit blocks (Q4_0, Q4_1, Q4_K) packed into llmkit's int4 kernel as stored, instead
of dequantized to float and re-quantized: decoded against the `gguf` package's dequantizer, the packed
layers' effective weights against the file's, and a changed model refused."""

import pytest
import torch
from gguf_helpers import tiny_model

import llmkit
from llmkit.errors import ConfigError
from llmkit.formats.gguf import INT4_TYPES, _names, read_gguf, read_int4_groups, write_gguf
from llmkit.generate.chat import load
from llmkit.quant import quantize
from llmkit.quant.linear import PackedLinear


@pytest.fixture(scope="module")
def model():  # rows of 256 inputs, so that Q4_K (blocks of 256) applies instead of its Q5_0 fallback
    return tiny_model(d_model=256, d_ff=512, std=0.05)


def dequantized(q, scale, zero):
    n, k = q.shape
    return ((q.float() - 8).reshape(n, k // 32, 32) * scale[..., None] + zero[..., None]).reshape(n, k)


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q4_K_M"])
def test_groups_decode_to_what_the_gguf_package_dequantizes(model, tmp_path, quant):
    """Every block linear stored in a 4-bit type is read, rows in llmkit's order (llama's q/k
    permutation undone), and decodes to the gguf package's float values to float32 rounding."""
    lm, tok = model
    types = write_gguf(tmp_path / "m.gguf", lm.config, lm.state_dict(), tok, quant=quant)
    names = _names(lm.config)
    want = {names[g].removesuffix(".weight") for g, t in types.items()
            if t in INT4_TYPES and names[g].startswith("blocks.")}
    groups, back = read_int4_groups(tmp_path / "m.gguf"), read_gguf(tmp_path / "m.gguf")
    assert set(groups) == want and want  # Q4_K_M keeps some layers in Q6_K / Q5_K: not among them
    if quant == "Q4_K_M":
        assert {types[g] for g in types if names[g].removesuffix(".weight") in want} == {"Q4_K"}
    for name, (q, scale, zero) in groups.items():
        w = back.tensors[name + ".weight"]
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        torch.testing.assert_close(dequantized(q, scale, zero), w, rtol=0, atol=1e-6 * float(w.abs().max()))


def effective_weight(layer: PackedLinear) -> torch.Tensor:
    """The weight the int4 kernel multiplies by: the identity's rows through it, 16 at a time (more
    rows would take the int8 prefill GEMM)."""
    eye = torch.eye(layer.in_features)
    return torch.cat([layer(rows) for rows in eye.split(16)]).T


def test_a_q4_0_file_is_packed_on_its_own_grid(model, tmp_path):
    """Q4_0's grid is symmetric (-8d .. 7d); re-quantizing its float copy to each group's min and max
    moves most weights. Packed from the blocks, each weight is the file's up to the bf16 rounding of
    its scale and of the kernel's output (relative 2^-8); re-quantized, off by up to half a step."""
    lm, tok = model
    path = tmp_path / "q4_0.gguf"
    write_gguf(path, lm.config, lm.state_dict(), tok, quant="Q4_0")
    file = read_gguf(path).tensors
    ours, _ = load(str(path), "int4")
    again = quantize(llmkit.load(path)[0], bits=4)  # the old way: the float copy re-quantized
    worst = {"blocks": 0.0, "requantized": 0.0}
    for name, packed in ours.blocks.named_modules():
        if not isinstance(packed, PackedLinear):
            continue
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        stem, last = name.rsplit(".", 1)
        w = torch.cat([file[f"blocks.{stem}.{p}.weight"] for p in parts.get(last, [last])])
        scale = float(w.abs().max())
        worst["blocks"] = max(worst["blocks"], float((effective_weight(packed) - w).abs().max()) / scale)
        redone = again.blocks.get_submodule(name)
        worst["requantized"] = max(worst["requantized"], float((effective_weight(redone) - w).abs().max()) / scale)
    assert worst["blocks"] <= 2 ** -7, worst
    assert worst["requantized"] > 4 * worst["blocks"], worst


def test_a_model_changed_since_reading_is_refused(model, tmp_path):
    lm, tok = model
    path = tmp_path / "q4_1.gguf"
    write_gguf(path, lm.config, lm.state_dict(), tok, quant="Q4_1")
    changed = llmkit.load(path)[0]
    with torch.no_grad():
        changed.blocks[1].mlp.up_proj.weight[3, 5] += 0.01
    with pytest.raises(ConfigError, match=r"blocks\.1\.mlp\.up_proj: the weight is not the file's int4 blocks"):
        quantize(changed, bits=4, groups=read_int4_groups(path))
    with pytest.raises(ConfigError, match="group_size=32"):
        quantize(llmkit.load(path)[0], bits=4, group_size=64, groups=read_int4_groups(path))
