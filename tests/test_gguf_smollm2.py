"""The real model: SmolLM2-135M-Instruct from its GGUF (Q4_1 with Q8_0 embeddings), by registry name.

Exactness is checked against transformers loading the same file (`gguf_file=`): both dequantize
with the gguf package, so after the Q/K un-permutation the logits must agree to float rounding.
"""

import io

import pytest
import torch
from gguf_helpers import SMOLLM2, smollm2

from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.formats.gguf import read_tokenizer
from llmkit.formats.named import resolve
from llmkit.generate.chat import ChatSession

pytestmark = pytest.mark.slow  # the first test pays for reading the file (~15-20 s on 2 cores)


def test_config_is_smollm2_135m():
    model, tok, path = smollm2()
    c, preset = model.config, ModelConfig.from_preset("smollm2-135m")
    for field in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff", "rope_theta",
                  "tie_embeddings", "bos_token_id", "eos_token_id", "max_seq_len"):
        assert getattr(c, field) == getattr(preset, field), field
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_tokenizer_from_metadata():
    tok = read_tokenizer(resolve(SMOLLM2))
    assert tok.vocab_size == 49152 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]  # specials matched whole
    assert len(tok.encode("2024")) == 4  # the `smollm` pre-tokenizer: one token per digit
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello")  # add_bos_token is false
    text = "Ünïcödé 日本語 🙂 def f(x):\n\treturn x  "
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_logits_equal_transformers_on_the_same_gguf():
    transformers = pytest.importorskip("transformers")
    model, tok, path = smollm2()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed "
                                   "the ocean blue; def f(x): return x ** 2")])
    with torch.no_grad():
        expected, ours = hf(ids).logits, model(ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_chat_answers_with_its_own_template():
    model, tok, _ = smollm2()
    session = ChatSession(model, tok, temperature=0.0, max_new_tokens=24)
    reply = "".join(session.send("What is the capital of France?"))
    assert "Paris" in reply
    assert session.history[-1] == {"role": "assistant", "content": reply.strip()}
    assert "<|im_end|>" not in reply  # the end-of-turn token stops the reply


def test_chat_verb_with_a_registry_name(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 2? Answer with a number.\n/exit\n"))
    assert main(["chat", SMOLLM2, "--temperature", "0", "--max-new-tokens", "12"]) == 0
    assert "4" in capsys.readouterr().out


def test_packed_bits_keeps_the_files_precision_class(tmp_path):
    """`--quantize auto` reads general.file_type: SmolLM2's Q4_1 runs int4; a file without the key, or a
    float one, is not quantized; llama.cpp's 5-8-bit types run int8 (the names of its enum)."""
    import gguf as gguf_package

    from llmkit.formats.gguf import packed_bits

    _, _, path = smollm2()
    assert packed_bits(path) == 4
    assert gguf_package.LlamaFileType(3).name == "MOSTLY_Q4_1"
    names = {t.name: packed_bits_of(t.value, tmp_path) for t in gguf_package.LlamaFileType
             if t.name in ("ALL_F32", "MOSTLY_BF16", "MOSTLY_Q8_0", "MOSTLY_Q6_K", "MOSTLY_Q4_K_M", "MOSTLY_IQ2_XS")}
    assert names == {"ALL_F32": None, "MOSTLY_BF16": None, "MOSTLY_Q8_0": 8, "MOSTLY_Q6_K": 8, "MOSTLY_Q4_K_M": 4,
                     "MOSTLY_IQ2_XS": 4}
    assert packed_bits_of(None, tmp_path) is None


def packed_bits_of(file_type, folder):
    """packed_bits of a metadata-only GGUF whose general.file_type is `file_type` (None: no such key)."""
    import gguf as gguf_package

    from llmkit.formats.gguf import packed_bits

    path = folder / f"ft{file_type}.gguf"
    w = gguf_package.GGUFWriter(str(path), "llama")
    if file_type is not None:
        w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return packed_bits(path)
