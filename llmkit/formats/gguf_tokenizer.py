"""GGUF tokenizer metadata (`tokenizer.ggml.*`) <-> llmkit `Tokenizer`.

llama.cpp stores a byte-level BPE ("gpt2" model) as its token strings, token types, merges and
the name of a pre-tokenizer (`tokenizer.ggml.pre`) whose regexes live in llama.cpp's source.
We rebuild the same pipeline with HF `tokenizers` so that our ids equal llama.cpp's: e.g.
`smollm` splits every digit on its own before GPT-2's regex (transformers' GGUF conversion has no
entry for it and so differs on numbers). A SentencePiece vocabulary ("llama" model: Gemma, Llama-2)
comes as tokens with scores; we rebuild llama.cpp's `llm_tokenizer_spm` as a byte-fallback BPE (see
`_sentencepiece`). Both are checked id for id against llama.cpp (tests/test_gguf_tokenizers.py).
Writing supports byte-level BPE only.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llmkit.errors import FormatError, LlmkitError
from llmkit.tokenizer import Tokenizer

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> how llama.cpp splits text before BPE (see llama-vocab.cpp).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "jina-v2-code")
_LLAMA3 = ("llama-bpe", "llama3", "smaug-bpe", "falcon3", "pixtral")
_QWEN2 = ("qwen2", "deepseek-r1-qwen")
KNOWN_PRE = (*_DIGITS_THEN_GPT2, *_GPT2, *_LLAMA3, *_QWEN2)


def _pre_tokenizer(pre: str, source: str):
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pattern = LLAMA3_PATTERN if pre in _LLAMA3 else QWEN2_PATTERN if pre in _QWEN2 else None
    if pattern is None:
        raise FormatError(f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer llmkit does not know; "
                          f"expected one of {', '.join(KNOWN_PRE)}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_metadata(meta: dict, source: str) -> Tokenizer:
    """Build the `Tokenizer` described by a GGUF file's `tokenizer.*` keys (`meta`: key -> value); any
    problem is a FormatError naming `source`."""
    try:
        return _from_metadata(meta, source)
    except LlmkitError as e:
        if source in str(e):
            raise
        raise FormatError(f"{source}: {e}") from None
    except Exception as e:  # tokenizers' own errors on a damaged vocabulary (a merge of tokens it lacks, ...)
        raise FormatError(f"{source}: the tokenizer in the metadata cannot be built ({type(e).__name__}: "
                          f"{str(e)[:200]}); the file is corrupt or was written by a broken converter") from None


def _from_metadata(meta: dict, source: str) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        missing = "tokenizer.ggml.model" if kind is None else "tokenizer.ggml.tokens"
        raise FormatError(f"{source}: the metadata has no tokenizer ({missing} is missing); expected "
                          "tokenizer.ggml.model and tokenizer.ggml.tokens")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise FormatError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        backend = _byte_level_bpe(meta, tokens, source)
    elif kind == "llama":
        backend = _sentencepiece(meta, tokens, types, source)
    else:
        raise FormatError(f"{source}: tokenizer.ggml.model is {kind!r}; llmkit reads byte-level BPE ('gpt2') and "
                          "SentencePiece ('llama') tokenizers")
    # llama.cpp matches these in the text before tokenizing (with `special`, as our encode does)
    added = [AddedToken(tokens[i], special=t != USER_DEFINED, normalized=False)
             for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
    if added:
        backend.add_tokens(added)  # keeps their ids: every one is already in the vocabulary

    def special(key: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, pad = special("bos"), special("eos"), special("padding")
    _add_bos_eos(backend, tokens, bos if meta.get("tokenizer.ggml.add_bos_token") else None,
                 eos if meta.get("tokenizer.ggml.add_eos_token") else None)
    return Tokenizer(backend, bos, eos, pad, chat_template=meta.get("tokenizer.chat_template"))


def _byte_level_bpe(meta: dict, tokens: list[str], source: str) -> Backend:
    if "tokenizer.ggml.merges" not in meta:
        raise FormatError(f"{source}: tokenizer.ggml.merges is missing; a 'gpt2' BPE tokenizer needs its merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"), source)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], source: str) -> Backend:
    """llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`) as a BPE over the same vocabulary.

    llama.cpp merges, anywhere in the text, the adjacent pair whose concatenation is the token with the
    highest score (leftmost on ties) and spells what never became a token as `<0xNN>` bytes. A BPE whose
    merges are every (left, right) split of every token, ranked by that token's score, with byte
    fallback, makes the same choices. No pre-tokenizer: llama.cpp merges across spaces (escaped as "▁").
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        found = "missing" if scores is None else f"{len(scores)} entries for {len(tokens)} tokens"
        raise FormatError(f"{source}: tokenizer.ggml.scores is {found}; a SentencePiece ('llama') tokenizer "
                          "ranks its merges by those scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    backend = Backend(models.BPE(vocab=vocab, merges=_merges_by_score(tokens, types, scores, vocab),
                                 unk_token=tokens[int(unk)] if unk is not None else None,
                                 fuse_unk=True, byte_fallback=True))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SPM
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []  # llama.cpp drops the prefix it added
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *strip])
    return backend


def _merges_by_score(tokens: list[str], types: list[int], scores, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of every mergeable token into two tokens, best-scored token first.
    Control, user-defined and unknown tokens are matched whole before tokenizing, never merged to."""
    ranked = []
    for i, token in enumerate(tokens):
        if types[i] in (CONTROL, USER_DEFINED, UNKNOWN):
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_bos_eos(backend: Backend, tokens: list[str], bos: int | None, eos: int | None) -> None:
    """Add BOS / EOS around every encoding (with `add_special_tokens`) as llama.cpp does."""
    if bos is None and eos is None:
        return
    first = f"{tokens[bos]} " if bos is not None else ""
    last = f" {tokens[eos]}" if eos is not None else ""
    specials = [(tokens[i], i) for i in dict.fromkeys(i for i in (bos, eos) if i is not None)]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{first}$A{last}", pair=f"{first}$A{last} {first}$B:1{last}", special_tokens=specials)


def _pre_name(backend: Backend) -> str:
    """The `tokenizer.ggml.pre` that reproduces this backend's pre-tokenizer in llama.cpp."""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern", {}).get("Regex")
        for name, known in (("llama-bpe", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN)):
            if pattern == known:
                return name
    raise FormatError(f"the tokenizer's pre-tokenizer {kinds} has no llama.cpp equivalent; expected GPT-2's "
                      "byte-level regex, digits + GPT-2 (smollm), or the Llama-3 / Qwen2 split")


def tokenizer_to_metadata(tokenizer: Tokenizer) -> dict:
    """The `tokenizer.*` GGUF keys for a byte-level BPE `Tokenizer` (values as Python lists/scalars)."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise FormatError("only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF; this one is "
                          f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}")
    n = tokenizer.vocab_size
    tokens = [tokenizer.id_to_token(i) for i in range(n)]
    if any(t is None for t in tokens):
        raise FormatError("the tokenizer's ids are not contiguous; GGUF needs a token for every id below the vocab size")
    types = [NORMAL] * n
    for entry in spec.get("added_tokens", []):
        types[entry["id"]] = CONTROL if entry.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(tokenizer.backend),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": _adds_bos(tokenizer),
        "tokenizer.ggml.add_space_prefix": False,
    }
    for key, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)):
        if i is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _adds_bos(tokenizer: Tokenizer) -> bool:
    if tokenizer.bos_id is None:
        return False
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    return len(with_specials) > len(tokenizer.encode("a")) and with_specials[0] == tokenizer.bos_id
