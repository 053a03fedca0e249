"""The pieces behind `llmkit generate`, `llmkit chat` and `llmkit next`, callable from a notebook.

`load` opens a checkpoint folder (model + tokenizer); `next_tokens` lists the most likely next
tokens; `ChatSession` keeps a conversation, renders it with the tokenizer's chat template and
streams the assistant's reply; `chat_loop` is the terminal loop around it (`/reset`, `/system`,
`/history`, `/exit`), with input and output passed in so tests can drive it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llmkit.errors import ConfigError
from llmkit.generate.api import stream
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer

MAX_NEW_TOKENS = 256  # a reply read at a terminal (SamplingParams' 16 is OpenAI's API default)
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # chatml, llama 3, gemma, phi


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids of the end-of-turn tokens this tokenizer has: a chat reply ends at any of them."""
    if not hasattr(tokenizer, "token_to_id"):
        return []
    return sorted({i for i in (tokenizer.token_to_id(t) for t in END_OF_TURN) if i is not None})


QUANTIZE = ("auto", "none", "int8", "int4")


def load(spec: str, quantize: str | None = None, threads: int | None = None,
         chat_template: str | None = None, dtype: str = "auto",
         device: str | None = None, max_model_len: int | None = None,
         adapter: str | None = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of an HF folder, a .gguf file, a registry name or a LoRA adapter folder (its
    recorded base with the adapter merged), ready to chat with:
    `quantize` "int8"/"int4" swaps in packed linears (llmkit/quant); "auto" (the CLI's default) does so
    for a quantized GGUF on the CPU at its own precision class (`gguf.packed_bits`: a Q4_1 file runs
    int4, a Q8_0 int8) unless `dtype` is given, as llama.cpp runs a file at its own bits; None or
    "none" keeps the weights as loaded. `threads` sets torch's,
    `chat_template` (a built-in name, a .jinja file or a Jinja string) replaces the tokenizer's, as
    vLLM's and llama.cpp's `--chat-template` do (base models such as Gemma-3-270M ship none);
    `dtype` ("auto" keeps the checkpoint's), `device` and `max_model_len` (a shorter context:
    prompt + reply) are vLLM's `--dtype`, `--device` and `--max-model-len`; `adapter` (a LoRA adapter
    or run folder) is merged into the model before it is quantized, whatever base it records."""
    from llmkit.peft.adapters import load as load_any
    from llmkit.peft.adapters import merge_into

    if quantize not in (None, *QUANTIZE):
        raise ConfigError(f"quantize={quantize!r}; expected one of {', '.join(QUANTIZE)}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_any(spec, dtype=DTYPES[dtype], device=device)
    if quantize == "auto":
        quantize = _own_bits(spec) if dtype == "auto" and model.device.type == "cpu" else None
    if adapter is not None:
        merge_into(model, adapter)
    if max_model_len is not None:
        model.config = model.config.cap_context(max_model_len)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if quantize not in (None, "none"):
        from llmkit.quant import quantize as swap

        groups = _file_groups(spec) if quantize == "int4" and adapter is None and model.dtype == torch.float32 else None
        swap(model, bits=int(quantize[3:]), groups=groups)
    return model, tokenizer


def _gguf_file(spec: str) -> Path | None:
    """The .gguf file `spec` names (a path or a registry name), or None for anything else."""
    from llmkit.formats import named
    from llmkit.peft.adapters import is_adapter

    path = None if is_adapter(spec) else named.resolve(spec)
    return path if path is not None and path.suffix == ".gguf" else None


def _own_bits(spec: str) -> str | None:
    """"int4"/"int8" for a quantized GGUF file (or registry name), None for anything else."""
    from llmkit.formats import gguf

    bits = None if (path := _gguf_file(spec)) is None else gguf.packed_bits(path)
    return None if bits is None else f"int{bits}"


def _file_groups(spec: str) -> dict | None:
    """A GGUF file's own int4 groups (Q4_0/Q4_1/Q4_K layers), packed as stored instead of re-quantized."""
    from llmkit.formats import gguf

    return None if (path := _gguf_file(spec)) is None else gguf.read_int4_groups(path)


def read_chat_template(option: str) -> str:
    """`--chat-template`'s value as Jinja: a built-in name or a Jinja string as is, a .jinja file read."""
    if option.endswith((".jinja", ".j2")):
        path = Path(option)
        if not path.is_file():
            raise ConfigError(f"chat template file {option} does not exist")
        return path.read_text(encoding="utf-8")
    return option


@torch.inference_mode()
def next_tokens(model: Transformer, tokenizer, text: str, k: int = 10) -> list[tuple[int, str, float]]:
    """The k most likely next tokens after `text`: (id, token text, probability), most likely first."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise ConfigError("the text is empty; expected at least one token to continue")
    if k < 1:
        raise ConfigError(f"k={k}; expected at least 1")
    if len(ids) > model.config.max_seq_len:
        raise ConfigError(f"the text has {len(ids)} tokens; the model's context is {model.config.max_seq_len}")
    logits = model(torch.tensor([ids], device=model.device))[0, -1]
    probs, top = torch.softmax(logits.float(), -1).topk(min(k, logits.shape[-1]))
    return [(i, tokenizer.decode([i]), p) for i, p in zip(top.tolist(), probs.tolist(), strict=True)]


class ChatSession:
    """A conversation: system prompt, history, and streamed assistant replies."""

    def __init__(self, model: Transformer, tokenizer, system: str | None = None, **sampling):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template; `llmkit chat` needs one "
                              "(tokenizer_config.json 'chat_template', chat_template.jinja, or --chat-template "
                              "NAME|FILE.jinja|JINJA)")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.history: list[dict] = []
        self.sampling = dict(sampling)
        self.sampling["stop_token_ids"] = sorted({*end_of_turn_ids(tokenizer),
                                                  *(self.sampling.get("stop_token_ids") or [])})
        self.sampling.setdefault("max_new_tokens", MAX_NEW_TOKENS)

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system or None

    def _prompt_ids(self) -> list[int]:
        """The rendered conversation; the oldest turns are dropped when it would not fit the context."""
        budget = self.model.config.max_seq_len - self.sampling["max_new_tokens"]
        while True:
            ids = self.tokenizer.encode_chat(self.messages)
            if len(ids) <= budget or len(self.history) <= 1:
                return ids[-budget:] if len(ids) > budget else ids
            self.history = self.history[2:]  # drop the oldest user/assistant exchange

    def send(self, user_text: str) -> Iterator[str]:
        """Add the user's message and stream the reply's text; the reply joins the history at the end."""
        self.history.append({"role": "user", "content": user_text})
        reply = []
        for chunk in stream(self.model, self.tokenizer, self._prompt_ids(), **self.sampling):
            reply.append(chunk.text)
            yield chunk.text
        self.history.append({"role": "assistant", "content": "".join(reply).strip()})


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> None:
    """Read a line, answer it, repeat; `/reset`, `/system TEXT`, `/history`, `/exit` (or end of input)."""
    write("Chat with the model. Commands: /reset, /system TEXT, /history, /exit")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            write("(history cleared)")
        elif line.startswith("/system"):
            session.reset(system=line[len("/system"):].strip())
            write(f"(system prompt set: {session.system!r}; history cleared)")
        elif line == "/history":
            for m in session.messages:
                write(f"[{m['role']}] {m['content']}")
        elif line.startswith("/"):
            write(f"(unknown command {line.split()[0]}; try /reset, /system TEXT, /history, /exit)")
        else:
            for piece in session.send(line):
                write_piece(write, piece)
            write("")


def write_piece(write: Callable[..., None], piece: str) -> None:
    """Print streamed text without a newline after each piece (for `print`-like writers)."""
    try:
        write(piece, end="", flush=True)
    except TypeError:  # a writer that takes only the text
        write(piece)
