"""Sampling parameters and logits processors: small pure functions applied in one fixed order.

The order is vLLM's, so that a request means the same thing here as on a vLLM or OpenAI server:

    1. raw logprobs are saved (log-softmax of the model's logits, before anything below)
    2. logit_bias          added to the named tokens
    3. min_tokens          end-of-sequence tokens are banned until `min_tokens` have been generated
    4. repetition_penalty  CTRL / transformers: every token already seen (prompt + generated) has its
                           logit divided by the penalty when positive, multiplied when negative
    5. frequency_penalty,  OpenAI: logit -= frequency_penalty * count + presence_penalty * (count > 0),
       presence_penalty    counts taken over the generated tokens only
    6. temperature == 0    greedy: the argmax of what is left, and nothing below applies
    7. temperature         logits / temperature
    8. min_p               tokens with p < min_p * p_max are dropped
    9. top_k               only the k most likely tokens are kept (ties with the k-th are kept too)
   10. top_p               the smallest set whose probability reaches top_p is kept (nucleus)

Every processor takes logits of shape (batch, vocab) and returns new ones; dropped tokens get -inf.
Sampling draws from softmax(logits) with a per-request `torch.Generator`, so a seeded request gives
the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from llmkit.errors import ConfigError

MIN_TEMPERATURE = 1e-5
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _token_id(key) -> int | None:
    """A logit_bias key as a token id (JSON keys are strings), or None when it is not one. Ten digits at
    most: Python refuses to parse very long integers, and no vocabulary is that large."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    if isinstance(key, str) and re.fullmatch(r"[0-9]{1,10}", key):
        return int(key)
    return None


def _short(value) -> str:
    """A value for an error message, cut so a huge field does not make a huge message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop; names follow the OpenAI API where one exists."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 keeps every token
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop: str | list[str] | None = None  # stop strings, matched on the decoded text
    stop_token_ids: list[int] | None = None  # extra token ids that end a sequence like EOS does
    seed: int | None = None
    n: int = 1  # samples per prompt
    ignore_eos: bool = False  # keep going past EOS (for benchmarks)
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token's logprob + the top k
    echo: bool = False  # also return the prompt's tokens' logprobs
    num_beams: int = 1  # > 1: beam search (deterministic; of the fields above it reads max_new_tokens, min_tokens, n, stop_token_ids, ignore_eos)
    length_penalty: float = 1.0  # beam score = sum of logprobs / generated length ** length_penalty
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    stop_strings: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.validate()

    def validate(self) -> None:
        """Every field's range, so a request that would fail (or overflow) mid-batch is refused up front.
        Checks that need the model (token ids against its vocabulary) are in `engine.make_sequences`."""
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={_short(getattr(self, name))} is invalid; expected {expected}", param=name)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0")
        # logits / temperature must stay finite in float32: below 1e-5 they overflow, above FLOAT32_MAX it is inf
        check(is_number(self.temperature) and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= FLOAT32_MAX),
              "temperature", f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {FLOAT32_MAX:.3g}]")
        check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        check(is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 disables it)")
        check(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        check(is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "a number in [-2, 2] (OpenAI's range)")
        check(is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
              "a number in [-2, 2] (OpenAI's range)")
        check(is_number(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100, "repetition_penalty",
              "a number in [0.01, 100] (1 disables it)")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        check(is_int(self.n) and self.n >= 1, "n", "an integer >= 1")
        check(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
              "None or an integer >= 0")
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", "a non-empty string or a list of them")
        check(self.stop_token_ids is None or all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "a list of token ids >= 0")
        check(self.seed is None or is_int(self.seed), "seed", "None or an integer")
        check(self.logit_bias is None or all(_token_id(k) is not None and is_number(v) and -100 <= v <= 100
                                             for k, v in self.logit_bias.items()),
              "logit_bias", "a map of token id -> bias in [-100, 100] (OpenAI's range)")
        check(is_int(self.num_beams) and self.num_beams >= 1, "num_beams", "an integer >= 1")
        check(self.num_beams == 1 or self.n <= self.num_beams, "n", f"at most num_beams={self.num_beams}")
        check(self.early_stopping in (True, False, "never"), "early_stopping", 'True, False or "never"')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---- the processors, in the order they run ---------------------------------------------------


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the model itself, saved before any processor changes the logits."""
    return torch.log_softmax(logits.float(), dim=-1)


def apply_logit_bias(logits: torch.Tensor, logit_bias: dict[int, float] | None) -> torch.Tensor:
    if not logit_bias:
        return logits
    ids = torch.tensor([_token_id(k) for k in logit_bias], dtype=torch.long, device=logits.device)  # JSON keys are str
    bias = torch.tensor([float(v) for v in logit_bias.values()], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, bias.expand(logits.shape[0], -1))


def apply_min_tokens(logits: torch.Tensor, n_generated: int, min_tokens: int, eos_ids: list[int]) -> torch.Tensor:
    """Ban every end-of-sequence token until `min_tokens` tokens have been generated."""
    if n_generated >= min_tokens or not eos_ids:
        return logits
    logits = logits.clone()
    logits[:, eos_ids] = -float("inf")
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty over every token `seen` (bool, batch x vocab): positive logits / p, negative * p."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                             presence: float) -> torch.Tensor:
    """OpenAI's penalties; `counts` (batch x vocab) counts each token among the generated ones."""
    if frequency == 0 and presence == 0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times that of the most likely token."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, -float("inf"))


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their total probability reaches `top_p` (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


# ---- the pipeline ----------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, params: SamplingParams, *, prompt_and_generated: torch.Tensor | None = None,
                   generated_counts: torch.Tensor | None = None, n_generated: int = 0,
                   eos_ids: list[int] = ()) -> torch.Tensor:
    """Steps 2-10 above except the final draw: the logits sampling draws from (fp32, batch x vocab).

    prompt_and_generated: bool (batch, vocab), which tokens have been seen (for the repetition penalty).
    generated_counts: (batch, vocab) counts of generated tokens (frequency and presence penalties).
    """
    logits = logits.float()
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = apply_min_tokens(logits, n_generated, params.min_tokens, list(eos_ids))
    if prompt_and_generated is not None:
        logits = apply_repetition_penalty(logits, prompt_and_generated, params.repetition_penalty)
    if generated_counts is not None:
        logits = apply_frequency_presence(logits, generated_counts, params.frequency_penalty,
                                          params.presence_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_min_p(logits, params.min_p)
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams,
           generators: list[torch.Generator | None] | torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row (long, shape (batch,)) from processed logits.

    Greedy takes the argmax. Otherwise each row draws with its own generator (a list, one per row),
    so a row's draw depends only on its own seed; a single generator (or None) draws the whole batch
    at once, which is what a frequency test over many rows wants.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if isinstance(generators, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generators, strict=True)])
    return torch.multinomial(probs, 1, generator=generators)[:, 0]


def make_generators(seed: int | None, count: int, device: torch.device | str = "cpu") -> list[torch.Generator | None]:
    """One generator per sample of a request: sample i of seed s is seeded with s + i."""
    if seed is None:
        return [None] * count
    gens = []
    for i in range(count):
        g = torch.Generator(device=device)
        g.manual_seed(seed + i)
        gens.append(g)
    return gens
