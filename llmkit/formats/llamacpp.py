"""llama.cpp as a reference runner for tests and benchmarks (optional: `pip install llmkit[llamacpp]`).

Wraps `llama-cpp-python` because it exposes llama.cpp's tokenizer and the full logits of every
position (`logits_all`); the prebuilt `xllamacpp` wheel only offers a server-style API (completions
with top-n probabilities), not the whole vocabulary's logits that KL and perplexity need.
`available()` says whether it is installed; everything else raises a clear error when it is not.

    from llmkit.formats.llamacpp import LlamaCpp
    ref = LlamaCpp("model.gguf")
    ids = ref.tokenize("Hello")            # llama.cpp's own tokenizer
    logits = ref.logits(ids)               # (len(ids), vocab) float32
    out = ref.greedy(ids, 32)              # greedy continuation (token ids), from the logits
    fast = LlamaCpp("model.gguf", logits_all=False).generate(ids, 32)  # llama.cpp's own loop, for timing
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmkit.errors import ConfigError

INSTALL_HINT = ("llama.cpp's Python binding is not installed; `make llamacpp` (or "
                "`pip install llama-cpp-python`) installs it")


def available() -> bool:
    """True when `llama_cpp` (llama-cpp-python) can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


class LlamaCpp:
    """One llama.cpp model and context, CPU only, deterministic (greedy, no sampling state)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 logits_all: bool = True, vocab_only: bool = False):
        """`logits_all=False` for speed measurements: `generate` then skips copying every position's logits;
        `vocab_only=True` loads the tokenizer alone (no weights: tokenize/detokenize only)."""
        try:
            from llama_cpp import Llama
        except (ImportError, OSError):
            raise ConfigError(INSTALL_HINT) from None
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.logits_all = logits_all
        self.llm = Llama(str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=logits_all,
                         n_threads=n_threads or os.cpu_count(), n_gpu_layers=0, vocab_only=vocab_only, verbose=False)

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """llama.cpp's token ids for `text` (`special`: match special tokens written in the text)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, ids: list[int]) -> str:
        """llama.cpp's text for `ids` (control tokens such as BOS render as nothing)."""
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), vocab) of a fresh evaluation of `ids` from position 0."""
        if not self.logits_all:
            raise ConfigError("this LlamaCpp was opened with logits_all=False; open it with logits_all=True")
        if len(ids) > self.n_ctx:
            raise ConfigError(f"{len(ids)} tokens exceed the llama.cpp context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy continuation of `ids` (argmax of llama.cpp's logits at each step); new ids only."""
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        n = len(ids)
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[n - 1]))
            out.append(nxt)
            if nxt in stop_ids or n + 1 > self.n_ctx:
                break
            self.llm.eval([nxt])
            n += 1
        return out

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding through llama.cpp's own sampler loop (top_k=1): what a speed benchmark times."""
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        for token in self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
            out.append(int(token))
            if len(out) >= max_new_tokens or token in stop_ids or len(ids) + len(out) >= self.n_ctx:
                break
        return out

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close:
            close()


# ---- comparing two models' logits (numpy; used by tests and benchmarks/gguf.py) ------------------


_ROWS = 256  # positions per chunk: float64 work arrays stay ~100 MB at a 49k vocabulary


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, mean and max KL(reference || ours) in nats, and max |logit difference|."""
    kl = np.concatenate([_kl(ours[i:i + _ROWS], reference[i:i + _ROWS]) for i in range(0, len(ours), _ROWS)])
    return {"top1": float((ours.argmax(-1) == reference.argmax(-1)).mean()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "max_abs_diff": float(np.abs(ours - reference).max()), "positions": len(kl)}


def _kl(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    lp, lq = log_softmax(reference), log_softmax(ours)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] given the logits at positions [:-1]."""
    targets = np.asarray(ids[1:])
    nll = []
    for i in range(0, len(targets), _ROWS):
        lp = log_softmax(logits[i:min(i + _ROWS, len(targets))])
        nll.append(-lp[np.arange(len(lp)), targets[i:i + len(lp)]])
    return float(np.exp(np.concatenate(nll).mean()))


def margin(logits: np.ndarray) -> float:
    """Gap between the best and second-best logit: how close a greedy choice was to a tie."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(top2[1] - top2[0])
