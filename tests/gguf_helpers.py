"""Shared pieces of the GGUF tests: a tiny model with a real BPE tokenizer, and SmolLM2 loaded once
per test session (dequantizing the 98 MB file takes ~15 s on 2 cores)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.formats.llamacpp import INSTALL_HINT, available
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer

SMOLLM2 = "smollm2-135m-instruct"

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Numbers 12345 and 3.14159 and 2026-11-22; emails like someone@example.com and URLs https://x.org",
] * 4

# Hard cases for a tokenizer: digits, code, whitespace runs, scripts, emoji, special tokens written in text.
TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 1,000,000 people paid $3.50 each (≈ €3.21).",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "    four spaces, then\ttab\t\ttabs and   three spaces   ",
    "\n\n\nnewlines\r\nwindows\r\n\n  \n",
    "Ünïcödé: naïve café, Straße, Ærøskøbing, São Paulo",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "Arabic مرحبا بالعالم and Hebrew שלום עולם",
    "हिन्दी देवनागरी लिपि",
    "3.14159265358979 is π; e ≈ 2.71828; 10^9 = 1e9; 0x1F; 007",
    "phone +1 (555) 123-4567, date 2026-11-22T16:15:00Z",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "It's they're we've I'm you'll he'd IT'S THEY'RE",
    "https://example.com/path?q=a%20b&x=1#frag user@mail.org",
    "!!!??? ... --- *** ### @@@ ((( ))) [[[ ]]] {{{ }}}",
    "SELECT name, COUNT(*) FROM users WHERE age >= 21 GROUP BY name;",
    "const f = (x) => x ** 2; // arrow\nlet arr = [1, 2, 3].map(f);",
    "   leading spaces and trailing   ",
    "a\u0301 combining, zero\u200bwidth, nbsp\u00a0here, ligature ﬁ",
]

# CI sets LLMKIT_REQUIRE_LLAMACPP=1: there the llama.cpp tests run (and fail loudly) instead of skipping.
needs_llamacpp = pytest.mark.skipif(not available() and not os.environ.get("LLMKIT_REQUIRE_LLAMACPP"),
                                    reason=INSTALL_HINT)


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=400, chat_template="chatml")


def tiny_model(d_model: int = 64, d_ff: int = 192, n_layer: int = 2, std: float = 0.02, seed: int = 0,
               tie: bool = False) -> tuple[Transformer, Tokenizer]:
    """A random llama-style model over `tiny_tokenizer()`; a large `std` makes its argmax decisive."""
    tok = tiny_tokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=d_model,
                         d_ff=d_ff, max_seq_len=256, init_std=std, tie_embeddings=tie, rope_theta=10000.0,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, name="tiny")
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # norm gains away from 1 so a wrong norm mapping cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model, tok


@functools.cache
def smollm2():
    """(model, tokenizer, gguf path) of SmolLM2-135M-Instruct, fetched and read once per session."""
    import llmkit
    from llmkit.formats.named import resolve

    model, tok = llmkit.load(SMOLLM2)
    return model, tok, resolve(SMOLLM2)


@functools.cache
def smollm2_hf_folder():
    """SmolLM2-135M-Instruct saved once per session as an HF folder (for transformers, peft, lm-eval)."""
    import tempfile
    from pathlib import Path

    model, tok, _ = smollm2()
    folder = Path(tempfile.mkdtemp(prefix="llmkit-smollm2-hf-"))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
