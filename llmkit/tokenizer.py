"""Tokenizers: byte-level BPE (trained or GPT-2's), character level, and chat templates.

One class wraps a HF `tokenizers.Tokenizer` (the Rust engine does the work), the special-token ids
and a Jinja chat template. It saves and loads the HF layout (`tokenizer.json` +
`tokenizer_config.json`), so transformers reads our tokenizers unchanged and we read theirs.
`apply_chat_template` returns the token ids together with the mask of assistant tokens that SFT
trains on; the mask is derived from the rendered text, so it works for any prefix-consistent template.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from llmkit.errors import ConfigError, DataError, FormatError, StorageError
from llmkit.files import atomic_path, atomic_write_json

ENDOFTEXT = "<|endoftext|>"
CHATML_SPECIALS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")
# An encoder's (BERT's) special tokens: documents end in [SEP]; MLM replaces chosen tokens by [MASK].
ENCODER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# ---- built-in chat templates (the strings the reference models ship) ----------------------------

CHAT_TEMPLATES: dict[str, str] = {
    # ChatML, as SmolLM2/Qwen ship it (without a default system prompt).
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Gemma-3 instruct, as google/gemma-3-*-it ships it (text content): the assistant's role is "model", a
    # system message is prepended to the first user turn. The base models' GGUFs carry no template.
    "gemma": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
        "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # Llama-2 chat, as meta-llama/Llama-2-*-chat-hf ships it.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}"
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Alpaca (Stanford): instruction / response blocks.
    "alpaca": (
        "{% if messages[0]['role'] != 'system' %}{{ 'Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    # Vicuna v1.1: USER:/ASSISTANT: on one line.
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        "{% set loop_messages = messages[1:] %}{% else %}"
        "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user\\'s questions. ' }}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + ' ' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}

# GPT-2's pre-tokenization regex (also used to build tiktoken encodings of GPT-2-style vocabularies).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character a vocab.json token uses -> its byte.

    Printable bytes stand for themselves; the other 68 map to chr(256 + n) in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    byte_of, n = {}, 0
    for b in range(256):
        if b in printable:
            byte_of[chr(b)] = b
        else:
            byte_of[chr(256 + n)] = b
            n += 1
    return byte_of


def _named_reader(spec: str | os.PathLike) -> Tokenizer:
    raise FormatError(f"{spec} is not a tokenizer folder (no reader of .gguf files and registry names is loaded)")


def register_named_reader(reader: Callable[[str | os.PathLike], Tokenizer]) -> None:
    """formats/named.py hands in its reader of .gguf files and registry names when it is imported (as
    `import llmkit` does), so `Tokenizer.from_pretrained` takes what `Transformer.from_pretrained`
    takes while this floor never imports the formats above it."""
    global _named_reader
    _named_reader = reader


def resolve_chat_template(template: str | None) -> str | None:
    """A built-in name (chatml, gemma, llama2, alpaca, vicuna) becomes its Jinja; anything else is Jinja."""
    if template is None:
        return None
    return CHAT_TEMPLATES.get(template, template)


def _compile_template(template: str):
    """Jinja in a sandbox, with the globals HF chat templates expect (as transformers renders them)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    """A HF `tokenizers.Tokenizer` plus special-token ids and a chat template.

    Build one from an in-memory backend (e.g. from GGUF metadata), with `train`, `train_chars`,
    `from_pretrained` or `from_gpt2_files`.
    """

    def __init__(self, backend: Backend, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, chat_template: str | None = None):
        self.backend = backend
        n = backend.get_vocab_size(with_added_tokens=True)
        for label, i in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if i is not None and not 0 <= i < n:
                raise ConfigError(f"tokenizer {label}={i} is out of range; expected an id in [0, {n})")
        self._bos, self._eos, self._pad = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self._compiled: tuple[str, object] | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = CHATML_SPECIALS,
              bos_token: str | None = ENDOFTEXT, eos_token: str | None = ENDOFTEXT, pad_token: str | None = None,
              chat_template: str | None = "chatml", min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE as GPT-2's: 256 byte tokens, then merges, then the special tokens."""
        special_tokens = list(dict.fromkeys(special_tokens))
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise ConfigError(f"vocab_size {vocab_size} is too small for a byte-level BPE; expected at least "
                              f"{floor} (256 bytes + {len(special_tokens)} special tokens)")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
                                      special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        seen = _NonEmpty(texts)
        backend.train_from_iterator(seen, trainer=trainer)
        if not seen.any:
            raise DataError("the training corpus is empty; expected at least one non-empty text to train on")
        return cls._with_specials(backend, special_tokens, bos_token, eos_token, pad_token, chat_template)

    def frame_as_encoder(self) -> Tokenizer:
        """`encode(text, add_special_tokens=True)` gives [CLS] text [SEP], as BERT's tokenizers do (the
        pooled [CLS] is what an encoder's classifier reads). Needs ENCODER_SPECIALS. Returns self."""
        ids = {t: self.token_to_id(t) for t in ("[CLS]", "[SEP]")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"the tokenizer has no {missing} token(s); train it with ENCODER_SPECIALS "
                              "(`llmkit tokenizer train --encoder`)")
        self.backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=list(ids.items()))
        return self

    @classmethod
    def train_chars(cls, texts: Iterable[str], special_tokens: Sequence[str] = CHATML_SPECIALS,
                    bos_token: str | None = ENDOFTEXT, eos_token: str | None = ENDOFTEXT, pad_token: str | None = None,
                    chat_template: str | None = "chatml") -> Tokenizer:
        """A character-level tokenizer: one id per character seen, with byte fallback for the rest.

        Unseen characters become their UTF-8 bytes (`<0xNN>` tokens, as in Llama's vocabulary), so any
        text round-trips, yet the common characters of the corpus are single tokens.
        """
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise DataError("the training corpus is empty; expected at least one non-empty text to collect characters from")
        special_tokens = list(dict.fromkeys(special_tokens))
        vocab: dict[str, int] = {}
        for token in [*special_tokens, *(f"<0x{b:02X}>" for b in range(256)), *sorted(chars)]:
            vocab.setdefault(token, len(vocab))
        backend = Backend(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        return cls._with_specials(backend, special_tokens, bos_token, eos_token, pad_token, chat_template)

    @classmethod
    def _with_specials(cls, backend: Backend, special_tokens: Sequence[str], bos: str | None, eos: str | None,
                       pad: str | None, chat_template: str | None) -> Tokenizer:
        """Mark the special tokens as such (matched whole in text, skipped on request) and find their ids."""
        specials = [*special_tokens, *(t for t in (bos, eos, pad) if t is not None)]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
        ids = [None if t is None else backend.token_to_id(t) for t in (bos, eos, pad)]
        return cls(backend, *ids, chat_template=chat_template)

    @classmethod
    def from_gpt2_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike,
                        chat_template: str | None = None) -> Tokenizer:
        """GPT-2's byte-level BPE from its `vocab.json` and `merges.txt` (`<|endoftext|>` is bos and eos)."""
        for path in (vocab_path, merges_path):
            if not Path(path).is_file():
                raise FormatError(f"GPT-2 tokenizer file {path} does not exist; expected vocab.json and merges.txt")
        try:
            model = models.BPE.from_file(str(vocab_path), str(merges_path))
        except Exception as e:
            raise FormatError(f"GPT-2 tokenizer files {vocab_path} / {merges_path} could not be read ({e}); "
                              "expected a JSON token->id map and a merges list of 'a b' lines") from None
        backend = Backend(model)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        eos = ENDOFTEXT if backend.token_to_id(ENDOFTEXT) is not None else None
        return cls._with_specials(backend, [eos] if eos else [], eos, eos, None, chat_template)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a HF folder (`tokenizer.json` + `tokenizer_config.json`) or GPT-2 `vocab.json` + `merges.txt`;
        a `.gguf` file or a registry name (`smollm2-135m-instruct`) as `Transformer.from_pretrained` takes it.

        The chat template comes from `chat_template.jinja` when present, else from tokenizer_config.json.
        """
        folder = Path(path)
        if not folder.exists() or folder.suffix == ".gguf":
            return _named_reader(path)
        if folder.is_file():
            folder = folder.parent
        config = _read_config(folder / "tokenizer_config.json")
        template = _pick_template(config.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():  # where transformers >= 4.50 saves it
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if (folder / "tokenizer.json").is_file():
            backend = _read_backend(folder / "tokenizer.json")
            ids = [_special_id(backend, config.get(key), folder) for key in ("bos_token", "eos_token", "pad_token")]
            return cls(backend, *ids, chat_template=template)
        for vocab, merges in (("vocab.json", "merges.txt"), ("gpt2_vocab.json", "gpt2_merges.txt")):
            if (folder / vocab).is_file() and (folder / merges).is_file():
                return cls.from_gpt2_files(folder / vocab, folder / merges, chat_template=template)
        raise FormatError(f"tokenizer folder {folder} has no tokenizer.json and no vocab.json + merges.txt; "
                          "expected one of the two layouts")

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template), each atomically."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "tokenizer.json") as tmp:
            try:
                self.backend.save(str(tmp))
            except Exception as e:  # tokenizers reports a failed write (a full disk) as a bare Exception
                raise StorageError(f"cannot write {folder / 'tokenizer.json'}: {e}") from None
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.id_to_token(self._bos) if self._bos is not None else None,
            "eos_token": self.id_to_token(self._eos) if self._eos is not None else None,
            "pad_token": self.id_to_token(self._pad) if self._pad is not None else None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_json(folder / "tokenizer_config.json", config)
        return folder

    # ---- the interface ------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template; assigning a built-in name (chatml, llama2, ...) stores its Jinja."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = resolve_chat_template(template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add special tokens (matched whole, never split; skipped on request) after the vocabulary, as
        transformers' `add_special_tokens` does, and return their ids; a token already present keeps its id.
        A model reading the new ids needs rows for them (`Transformer.resize_vocab`)."""
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self._compiled = None
        return [self.backend.token_to_id(t) for t in tokens]

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # the batch call releases the GIL while it runs (a long prompt does not stall the server's
        # event loop) and skips the character offsets, which makes it faster too
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos}, eos_id={self._eos}, pad_id={self._pad})"

    # ---- chat ---------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The conversation as text, rendered by the chat template (Jinja, as transformers renders it)."""
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat_template; expected one in tokenizer_config.json or a built-in "
                              f"name ({', '.join(CHAT_TEMPLATES)})")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ConfigError(f"chat message {i} is {m!r}; expected a dict with 'role' and 'content'")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, _compile_template(self.chat_template))
        bos = self.id_to_token(self._bos) if self._bos is not None else ""
        eos = self.id_to_token(self._eos) if self._eos is not None else ""
        return self._compiled[1].render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        bos_token=bos, eos_token=eos, **kwargs)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat, rendered once (what inference needs; no assistant mask)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            **kwargs) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and a 0/1 mask that is 1 on assistant tokens (what SFT learns).

        Each assistant message's span is the text its turn adds after the generation prompt (its content
        and end-of-turn token), found by rendering the conversation up to it; surrounding whitespace is
        left out. The whole text is then encoded at once, so the ids are exactly those of inference.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_chat(messages[:i], add_generation_prompt=True, **kwargs) if i else ""
            upto = self.render_chat(messages[: i + 1], **kwargs)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ConfigError(f"chat template is not prefix-consistent at message {i}: rendering the conversation "
                                  "up to an assistant turn must be a prefix of the full rendering; expected a "
                                  "template that renders messages in order")
            start, end = len(before), len(upto)
            delta = upto[start:end]
            start += len(delta) - len(delta.lstrip())
            end -= len(delta) - len(delta.rstrip())
            spans.append((start, end))
        encoding = self.backend.encode(text, add_special_tokens=False)
        # A token is scored when it overlaps a span. The spans are disjoint and in order, so the only
        # candidate is the last one starting before the token ends.
        starts = [a for a, _ in spans]
        mask = []
        for s, e in encoding.offsets:
            j = bisect.bisect_left(starts, e) - 1
            mask.append(int(j >= 0 and spans[j][1] > s))
        return encoding.ids, mask


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, what: str) -> None:
    """Log-prob ratios and distillation compare the same token ids, so two models must share a tokenizer."""
    va, vb = a.backend.get_vocab(), b.backend.get_vocab()
    if va != vb or (a.bos_id, a.eos_id) != (b.bos_id, b.eos_id):
        differ = sum(1 for t, i in va.items() if vb.get(t) != i) + len(set(vb) - set(va))
        raise ConfigError(f"{what} has a different tokenizer from the policy ({len(vb)} vs {len(va)} tokens, "
                          f"{differ} tokens differ, bos/eos {b.bos_id}/{b.eos_id} vs {a.bos_id}/{a.eos_id}); "
                          "expected the same tokenizer, since their token log-probs are compared id by id")


class _NonEmpty:
    """An iterator over texts that remembers whether any was non-empty (the trainer does not tell)."""

    def __init__(self, texts: Iterable[str]):
        self._it = iter(texts)
        self.any = False

    def __iter__(self):
        for t in self._it:
            if t:
                self.any = True
                yield t


def _read_backend(path: Path) -> Backend:
    """The tokenizer.json without the fixed padding and truncation some carry (BERT's pad every text to
    128 ids): as with transformers, a caller pads and truncates when it asks to."""
    try:
        backend = Backend.from_file(str(path))
        backend.no_padding()
        backend.no_truncation()
        return backend
    except Exception as e:
        raise FormatError(f"tokenizer file {path} could not be parsed ({str(e)[:200]}); expected a HF tokenizers JSON "
                          "(tokenizer.json written by tokenizers or transformers)") from None


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"tokenizer config {path} is not valid JSON ({e}); expected a JSON object") from None
    if not isinstance(config, dict):
        raise FormatError(f"tokenizer config {path} holds {type(config).__name__}; expected a JSON object")
    return config


def _pick_template(template) -> str | None:
    """`chat_template` is a string, or a list of {name, template} (pick 'default', else the first)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _special_id(backend: Backend, token, folder: Path) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} as older transformers write it
        token = token.get("content")
    if token is None:
        return None
    i = backend.token_to_id(token)
    if i is None:
        raise FormatError(f"tokenizer_config.json in {folder} names special token {token!r}, which is not in "
                          "tokenizer.json's vocabulary; expected a token of the vocabulary")
    return i


__all__ = ["CHAT_TEMPLATES", "CHATML_SPECIALS", "ENDOFTEXT", "GPT2_PATTERN", "Tokenizer", "resolve_chat_template"]
