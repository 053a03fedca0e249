"""GGUF writing and reading on tiny models: round trips per file type, the tokenizer in the metadata,
the export verb, and bad files (each one FormatError naming what is wrong)."""

import gguf
import numpy as np
import pytest
import torch
from gguf_helpers import CORPUS, tiny_model

import llmkit
from llmkit.cli import main
from llmkit.errors import ConfigError, FormatError
from llmkit.formats import gguf_quants
from llmkit.formats.gguf import _names as gguf_names
from llmkit.formats.gguf import permute_qk, read_gguf, unpermute_qk, write_gguf

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 64, 1]])


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _logits(model):
    with torch.no_grad():
        return model(IDS)


def _same_config(a, b):
    assert a.replace(norm_eps=1e-5, name="x") == b.replace(norm_eps=1e-5, name="x")
    assert b.norm_eps == pytest.approx(a.norm_eps, rel=1e-6)  # stored as float32


def test_f32_round_trip_is_exact(tiny, tmp_path):
    model, tok = tiny
    types = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant="F32")
    assert set(types.values()) == {"F32"}
    back = read_gguf(tmp_path / "m.gguf")
    _same_config(model.config, back.config)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(back.tensors[name], t, rtol=0, atol=0, msg=name)
    assert back.metadata["general.architecture"] == "llama"
    torch.testing.assert_close(_logits(llmkit.load(tmp_path / "m.gguf")[0]), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("quant,dtype", [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_half_precision_round_trip(tiny, tmp_path, quant, dtype):
    model, tok = tiny
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant=quant)
    back = read_gguf(tmp_path / "m.gguf")
    for name, t in model.state_dict().items():
        expected = t if t.dim() == 1 else t.to(dtype).float()  # norms stay F32, as llama.cpp writes them
        torch.testing.assert_close(back.tensors[name], expected, rtol=0, atol=0, msg=name)


# Each block type below rounds every value of a block of 32 to the nearest point of a grid whose step
# the block sets (ggml-quants.c's reference quantizers, which the `gguf` package implements): Q8_0
# steps of max|x|/127, Q4_0 max|x|/8 (levels -8..7), Q5_0 max|x|/16, Q4_1 (max - min)/15 (16 levels
# up from the min), Q5_1 (max - min)/31. Rounding to nearest leaves an error uniform on +-step/2, of
# rms step/sqrt(12), on every value but the extremes, which lie on the grid (one a block for the
# symmetric types, two for those with a min). IQ4_NL's grid is IQ4_NL_VALUES times max/-127, not
# evenly spaced: each value's error is uniform across the cell it falls in.
_GRID = {"Q8_0": (lambda b: np.abs(b).max(1) / 127, 1), "Q4_0": (lambda b: np.abs(b).max(1) / 8, 1),
         "Q5_0": (lambda b: np.abs(b).max(1) / 16, 1), "Q4_1": (lambda b: (b.max(1) - b.min(1)) / 15, 2),
         "Q5_1": (lambda b: (b.max(1) - b.min(1)) / 31, 2)}
# Measured error / expected over these tensors (2,048 to 25,600 values, where the sampling spread of
# a uniform error's rms is ~1 %): 0.99-1.03 for the round-to-nearest types, 0.91-0.93 for IQ4_NL
# (its scale search beats max/127). 1.1 fails a quantizer that floors instead of rounding (2x);
# the floor fails one that keeps more levels than its type (Q5_0 bytes labelled Q4_0: 0.5x).
_RATIO = {"IQ4_NL": (0.85, 1.1)}


def expected_error(w: np.ndarray, type_name: str) -> float:
    """|w_q - w| / |w| that round-to-nearest on `type_name`'s grid leaves on w, block by block."""
    b = w.reshape(-1, 32).astype(np.float64)
    if type_name == "IQ4_NL":
        grid = gguf_quants.IQ4_NL_VALUES.astype(np.float64)
        d = -np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1) / 127  # the max lands on -127
        cell = np.clip(np.searchsorted(grid, b / d) - 1, 0, len(grid) - 2)
        squared = ((grid[cell + 1] - grid[cell]) * d) ** 2 / 12
    else:
        step, exact = _GRID[type_name]
        squared = (32 - exact) * step(b) ** 2 / 12
    return float(np.sqrt(squared.sum()) / np.linalg.norm(b))


def check_quantization_error(name: str, original: torch.Tensor, decoded: torch.Tensor,
                             type_name: str) -> tuple[float, float]:
    """The relative error of `decoded`, and that as a multiple of what its type's rounding leaves."""
    w = original.numpy()
    rel = float(np.linalg.norm(decoded.numpy() - w) / np.linalg.norm(w))
    ratio = rel / expected_error(w, type_name)
    low, high = _RATIO.get(type_name, (0.9, 1.1))
    assert low < ratio < high, (name, type_name, rel, ratio)
    return rel, ratio


def _check_file(path, model, types):
    """Every quantized tensor of the file: its bytes are the `gguf` package's quantization of the
    weight in GGUF's layout (for the types the package quantizes), and what llmkit reads back has
    its type's rounding error."""
    config, state = model.config, model.state_dict()
    back, raw = read_gguf(path), {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    ratios = {}
    for g, ours in gguf_names(config).items():
        if types[g] in ("F32", "F16", "BF16"):
            continue
        x = state[ours].numpy()
        if g.endswith(("attn_q.weight", "attn_k.weight")):
            x = permute_qk(x, config.n_head if g.endswith("attn_q.weight") else config.n_kv_head)
        if types[g] not in gguf_quants.QUANTIZERS:  # IQ4_NL and the K-quants are ours: the package has none
            reference = gguf.quants.quantize(x, gguf.GGMLQuantizationType[types[g]])
            np.testing.assert_array_equal(np.asarray(raw[g].data), reference, err_msg=g)
        ratios.setdefault(types[g], []).append(check_quantization_error(ours, state[ours], back.tensors[ours],
                                                                        types[g]))
    for t, r in ratios.items():
        (rels, multiples) = zip(*r, strict=True)
        print(f"{t}: error {min(rels):.4f}-{max(rels):.4f}, {min(multiples):.3f}-{max(multiples):.3f} x expected")
    return ratios


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_1", "Q4_0"])
def test_quantized_round_trip_has_its_types_rounding_error(tiny, tmp_path, quant):
    model, tok = tiny
    types = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant=quant)
    assert types["blk.0.attn_q.weight"] == quant and types["blk.0.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "Q8_0"  # llama.cpp keeps the output at Q8_0 when rows are not 256-wide
    assert set(_check_file(tmp_path / "m.gguf", model, types)) == {quant, "Q8_0"}
    back = read_gguf(tmp_path / "m.gguf")
    for name, t in model.state_dict().items():
        if t.dim() == 1:  # norms stay F32
            torch.testing.assert_close(back.tensors[name], t, rtol=0, atol=0, msg=name)


def test_a_quantizer_that_floors_fails_the_error_check(tiny, tmp_path, monkeypatch):
    """The check above can fail: Q8_0 with its rounding turned into a floor leaves twice the error."""
    model, tok = tiny
    monkeypatch.setattr(gguf.quants, "np_roundf", np.floor)
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant="Q8_0")
    back = read_gguf(tmp_path / "m.gguf")
    w = model.state_dict()["blocks.0.attn.q_proj.weight"]
    with pytest.raises(AssertionError):
        check_quantization_error("q", w, back.tensors["blocks.0.attn.q_proj.weight"], "Q8_0")
    rel = float((back.tensors["blocks.0.attn.q_proj.weight"] - w).norm() / w.norm())
    assert rel / expected_error(w.numpy(), "Q8_0") > 1.7  # uniform on [0, step): rms step/sqrt(3)


def test_permutation_is_llama_cpp_layout():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of head_dim 8
    p = permute_qk(w, 2)
    # head 0: rows (0, 4), (1, 5), ... become adjacent pairs
    assert [int(r) for r in p[:, 0][:8] // 3] == [0, 4, 1, 5, 2, 6, 3, 7]
    np.testing.assert_array_equal(unpermute_qk(p, 2), w)


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q3_K_M", "Q5_K_M"])
def test_k_quant_files_read_back_bit_exact(tmp_path, quant):
    model, tok = tiny_model(d_model=256, d_ff=512, n_layer=3)
    types = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant=quant)
    assert types == gguf_quants.plan_types(model.config, quant)
    assert {"Q6_K"} <= set(types.values()) if quant != "Q3_K_M" else {"Q3_K", "Q4_K", "Q5_K"} <= set(types.values())
    back = read_gguf(tmp_path / "m.gguf")
    assert back.tensor_types == types
    w = model.state_dict()["blocks.1.mlp.down_proj.weight"].numpy()
    expected = gguf_quants.QUANTIZERS[types["blk.1.ffn_down.weight"]](w)[1]
    np.testing.assert_array_equal(back.tensors["blocks.1.mlp.down_proj.weight"].numpy(), expected)
    q = model.state_dict()["blocks.0.attn.q_proj.weight"].numpy()
    rel = np.linalg.norm(back.tensors["blocks.0.attn.q_proj.weight"].numpy() - q) / np.linalg.norm(q)
    assert rel < 0.2


@pytest.mark.parametrize("quant,fallbacks", [("Q4_K_M", {"Q5_0", "Q8_0"}), ("Q3_K_M", {"IQ4_NL", "Q5_0", "Q5_1", "Q8_0"})])
def test_rows_not_multiple_of_256_use_llama_cpp_fallbacks(tiny, tmp_path, quant, fallbacks):
    model, tok = tiny  # d_model 64: no K-quant block fits, as with SmolLM2's 576
    types = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant=quant)
    assert set(types.values()) - {"F32"} == fallbacks
    assert set(_check_file(tmp_path / "m.gguf", model, types)) == fallbacks


def test_tokenizer_round_trip(tiny, tmp_path):
    model, tok = tiny
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, quant="F16")
    back = read_gguf(tmp_path / "m.gguf").tokenizer
    assert (back.bos_id, back.eos_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    assert back.chat_template == tok.chat_template
    texts = [*CORPUS[:5], "<|im_start|>user\nhi<|im_end|>", "  spaces\t\tand\n\nnewlines  ", "ünïcödé 日本語 🙂"]
    for text in texts:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(back.encode(text)) == text
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    assert back.apply_chat_template(chat) == tok.apply_chat_template(chat)


def test_export_verb_and_gguf_in_the_generate_verb(tiny, tmp_path, capsys):
    model, tok = tiny
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "tiny-q8.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert "tiny-q8.gguf" in capsys.readouterr().out
    loaded, loaded_tok = llmkit.load(out)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0.05, rtol=0)
    assert loaded_tok.encode(CORPUS[0]) == tok.encode(CORPUS[0])
    assert main(["generate", str(out), "--prompt", "The quick", "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    # the verbs run a quantized file at its own bits by default: Q8_0 -> int8 packed linears
    from llmkit.formats.gguf import packed_bits
    from llmkit.generate.chat import load
    from llmkit.quant.linear import PackedLinear

    assert packed_bits(out) == 8
    bits = {str(out): {8}, "auto-dtype": set(), str(folder): set()}
    for spec, want in bits.items():
        lm = load(str(out), "auto", dtype="float32")[0] if spec == "auto-dtype" else load(spec, "auto")[0]
        assert {m.bits for m in lm.modules() if isinstance(m, PackedLinear)} == want, spec
    assert main(["info", str(out)]) == 0  # metadata only: the same config as the model read whole
    assert f"parameters: {model.num_parameters():,}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses a file type we do not write
        main(["export", str(folder), "--quant", "Q2_K", "--out", str(out)])


def test_export_format_hf_writes_a_checkpoint_folder_of_a_gguf(f32_file, tmp_path, capsys):
    folder = tmp_path / "from-gguf"
    assert main(["export", str(f32_file), "--format", "hf", "--out", str(folder)]) == 0
    assert "HF checkpoint" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    (a, tok_a), (b, tok_b) = llmkit.load(f32_file), llmkit.load(folder)
    torch.testing.assert_close(_logits(b), _logits(a), atol=0, rtol=0)
    assert tok_b.encode(CORPUS[0]) == tok_a.encode(CORPUS[0])


def test_export_refuses_what_gguf_cannot_hold(tmp_path):
    gpt2 = llmkit.Transformer(llmkit.ModelConfig.from_preset("gpt2", n_layer=1, d_model=64, n_head=2,
                                                               vocab_size=400))
    _, tok = tiny_model()
    with pytest.raises(ConfigError, match="llama-style"):
        write_gguf(tmp_path / "g.gguf", gpt2.config, gpt2.state_dict(), tok)
    model, _ = tiny_model()
    with pytest.raises(ConfigError, match="not supported"):
        write_gguf(tmp_path / "g.gguf", model.config, model.state_dict(), tok, quant="Q2_K")
    chars = llmkit.Tokenizer.train_chars(CORPUS)
    with pytest.raises(FormatError, match="byte-level BPE"):
        write_gguf(tmp_path / "g.gguf", model.config.replace(vocab_size=chars.vocab_size), {}, chars)
    assert not (tmp_path / "g.gguf").exists()


# ---- bad files ----------------------------------------------------------------------------------


def _rewrite(src, dst, arch=None, drop=(), retype=None, strings=None):
    """Copy a GGUF with changes: another architecture name, keys dropped, string keys replaced, one
    tensor's type replaced."""
    r = gguf.GGUFReader(str(src))
    old_arch = r.fields["general.architecture"].contents()
    arch = arch or old_arch
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith(drop):
            continue
        name = arch + key[len(old_arch):] if key.startswith(old_arch + ".") else key
        if strings and name in strings:
            w.add_string(name, strings[name])
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if retype and t.name == retype[0]:
            qtype = gguf.GGMLQuantizationType[retype[1]]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            nbytes = gguf.quants.quant_shape_to_byte_shape((rows, cols), qtype)
            w.add_tensor(t.name, np.zeros(nbytes, dtype=np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    model, tok = tiny_model()
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    write_gguf(path, model.config, model.state_dict(), tok, quant="F32")
    return path


def test_the_rewriter_itself_keeps_a_readable_file(f32_file, tmp_path):
    same = read_gguf(_rewrite(f32_file, tmp_path / "same.gguf"))
    torch.testing.assert_close(same.tensors["embed.weight"], read_gguf(f32_file).tensors["embed.weight"])


@pytest.mark.parametrize("keep", [100, 4000, 0.5, 0.999])
def test_truncated_file(f32_file, tmp_path, keep):
    data = f32_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(FormatError, match="truncated"):
        read_gguf(cut)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(FormatError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(FormatError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FormatError, match="not GGUF"):
        llmkit.load(bad.with_suffix(".bin").write_bytes(b"xx") and bad.with_suffix(".bin"))


def test_unsupported_architecture(f32_file, tmp_path):
    with pytest.raises(FormatError, match="unsupported architecture 'mamba'"):
        read_gguf(_rewrite(f32_file, tmp_path / "g.gguf", arch="mamba"))


def test_unsupported_tensor_type(f32_file, tmp_path):
    path = _rewrite(f32_file, tmp_path / "t.gguf", retype=("blk.1.attn_q.weight", "MXFP4"))
    with pytest.raises(FormatError, match=r"'blk.1.attn_q.weight' has type MXFP4"):
        read_gguf(path)


def test_missing_tokenizer(f32_file, tmp_path):
    with pytest.raises(FormatError, match="no tokenizer"):
        read_gguf(_rewrite(f32_file, tmp_path / "n.gguf", drop=("tokenizer.",)))
    with pytest.raises(FormatError, match="merges is missing"):
        read_gguf(_rewrite(f32_file, tmp_path / "m.gguf", drop=("tokenizer.ggml.merges",)))
    with pytest.raises(FormatError, match="'llama.block_count' is missing"):
        read_gguf(_rewrite(f32_file, tmp_path / "b.gguf", drop=("llama.block_count",)))


def test_unsupported_tokenizers(f32_file, tmp_path):
    with pytest.raises(FormatError, match="tokenizer.ggml.pre is 'mystery'"):
        read_gguf(_rewrite(f32_file, tmp_path / "p.gguf", strings={"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(FormatError, match="tokenizer.ggml.model is 'bert'"):
        read_gguf(_rewrite(f32_file, tmp_path / "w.gguf", strings={"tokenizer.ggml.model": "bert"}))
    with pytest.raises(FormatError, match="tokenizer.ggml.scores is missing"):  # SentencePiece needs its scores
        read_gguf(_rewrite(f32_file, tmp_path / "s.gguf", strings={"tokenizer.ggml.model": "llama"}))


def test_unknown_model_name():
    with pytest.raises(FormatError, match="smollm2-135m-instruct"):
        llmkit.load("no-such-model")
