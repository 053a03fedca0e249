"""The OpenAI request bodies (pydantic, so FastAPI publishes them in its OpenAPI schema), their
validation and `to_sampling_params`, and the logprob shapes of the responses: the legacy
completions one (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and the chat one
(`content: [{token, logprob, bytes, top_logprobs}]`).

Fields are strict: a number sent as a string, or `true` where a token id belongs, is a 400, not a
guess. Extra fields are ignored, as OpenAI and vLLM ignore them. vLLM's extensions (top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos) are accepted with vLLM's meaning. Every
check runs before the request reaches the scheduler, so an invalid request costs no model time and
cannot disturb the requests it would have shared a batch with.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from llmkit.errors import ConfigError
from llmkit.generate.engine import check_token_fields
from llmkit.generate.sampling import SamplingParams
from llmkit.generate.text import IncrementalDecoder
from llmkit.serve.config import ServeConfig
from llmkit.serve.errors import APIError
from llmkit.tokenizer import gpt2_byte_decoder

_BYTE_OF = gpt2_byte_decoder()
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = STRICT

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(0, description="0 or -1 keeps every token")
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def to_sampling_params(self, limits: ServeConfig, vocab_size: int, context: int, prompts: list[list[int]],
                           default_max: int | None, **extra) -> SamplingParams:
        """The request's SamplingParams, or an APIError naming the field: context, limits, ranges, vocabulary.
        `extra` holds the endpoint's own fields (logprobs, echo; chat's stop_token_ids with its end-of-turn ids)."""
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                                f"{longest} tokens; shorten it (at most {context - 1})", param="prompt",
                           code="context_length_exceeded")
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max
        if max_tokens is None:
            max_tokens = min(limits.max_tokens_limit, context - longest)
        if max_tokens > limits.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens_limit}",
                           param="max_tokens")
        rows = self.n * len(prompts)
        if not 1 <= rows <= limits.max_rows:
            raise APIError(400, f"n={self.n} with {len(prompts)} prompt(s) asks for {rows} sequences; expected 1 "
                                f"to {limits.max_rows}", param="n")
        need = self.n * (longest + min(max(max_tokens, 0), context - longest))
        if need > limits.kv_budget:
            raise APIError(400, f"n={self.n} x ({longest} prompt + {max_tokens} new tokens) needs {need} tokens of KV "
                                f"cache, over this server's budget of {limits.kv_budget}; lower max_tokens or n",
                           param="max_tokens")
        if self.seed is not None and not -(2 ** 63) <= self.seed <= 2 ** 63 - 1 - self.n:
            raise APIError(400, f"seed={self.seed} is out of range; expected a 64-bit integer", param="seed")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        limit(len(stops) <= limits.max_stops, "stop", f"{len(stops)} stop strings", f"at most {limits.max_stops}")
        limit(all(len(s) <= limits.max_stop_chars for s in stops), "stop",
              f"a stop string over {limits.max_stop_chars} characters", f"at most {limits.max_stop_chars}")
        asked = self.stop_token_ids or []
        limit(len(asked) <= limits.max_stops, "stop_token_ids", f"{len(asked)} stop token ids",
              f"at most {limits.max_stops}")
        limit(len(self.logit_bias or {}) <= limits.max_logit_bias, "logit_bias",
              f"{len(self.logit_bias or {})} entries", f"at most {limits.max_logit_bias}")
        logprobs = extra.get("logprobs")
        limit(logprobs is None or logprobs <= limits.max_logprobs, "logprobs", f"logprobs={logprobs}",
              f"at most {limits.max_logprobs}")
        stop_ids = extra.pop("stop_token_ids", self.stop_token_ids)
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                    top_k=0 if self.top_k == -1 else self.top_k, min_p=self.min_p,
                                    frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                                    repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias,
                                    stop=self.stop, seed=self.seed, n=self.n, min_tokens=self.min_tokens,
                                    ignore_eos=self.ignore_eos, stop_token_ids=stop_ids, **extra)
            check_token_fields(params, vocab_size)
        except ConfigError as e:
            param = {"max_new_tokens": "max_tokens"}.get(e.param, e.param)
            raise APIError(400, str(e).replace("max_new_tokens", "max_tokens"), param=param) from None
        return params


def limit(ok: bool, param: str, what: str, expected: str) -> None:
    """A resource limit of this server (ServeConfig), reported as a 400 naming the field."""
    if not ok:
        raise APIError(400, f"{param}: {what} is over this server's limit; expected {expected}", param=param)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        """The completions API's own fields: what this server does not do is refused by name."""
        if self.suffix:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, f"best_of={self.best_of} is not supported; expected it unset or equal to n",
                           param="best_of")
        if self.echo and self.stream:
            raise APIError(400, "echo cannot be combined with stream", param="echo")


class ContentPart(BaseModel):
    model_config = STRICT

    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: str | list[ContentPart] | None = None


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the chat template takes them; a content part the model cannot read (an
    image, audio) is refused by name rather than dropped, which would answer a different question."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise APIError(400, f"messages[{i}].content[{j}] has type {part.type!r}; this model reads text "
                                        "only (expected type 'text')", param=f"messages.{i}.content.{j}.type")
            content = "".join(part.text for part in content)
        out.append({"role": m.role, "content": content or ""})
    return out


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None

    def check(self, limits: ServeConfig) -> None:
        """The chat API's own fields; `max_completion_tokens` (OpenAI's newer name) sets max_tokens."""
        if not self.messages:
            raise APIError(400, "messages is empty; expected at least one message", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        most = min(20, limits.max_logprobs)
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= most:
            raise APIError(400, f"top_logprobs={self.top_logprobs}; expected 0 to {most}", param="top_logprobs")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings body: text(s) or token ids in `input`; float lists or base64 float32 back."""

    model_config = STRICT

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """Each input as a text or a list of token ids; an APIError for an empty one or an unknown format."""
        if self.encoding_format not in ("float", "base64"):
            raise APIError(400, f"encoding_format={self.encoding_format!r}; expected 'float' or 'base64'",
                           param="encoding_format")
        items = self.input
        if isinstance(items, str) or (items and all(isinstance(t, int) for t in items)):
            items = [items]
        if not items or any(len(t) == 0 for t in items):
            raise APIError(400, "input is empty; expected a text, a list of texts or token ids", param="input")
        return list(items)


class ModerationRequest(BaseModel):
    """OpenAI's /v1/moderations body: one text or a list of texts (`model` is optional, as OpenAI's)."""

    model_config = STRICT

    model: str | None = None
    input: str | list[str]

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise APIError(400, "input is empty; expected a text or a list of texts", param="input")
        return items


class TokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[int]


# ---- logprobs in the responses ---------------------------------------------------------------


def token_bytes(tokenizer, i: int) -> bytes:
    """The bytes token `i` stands for: byte-level BPE tokens can hold part of a UTF-8 character."""
    text = tokenizer.decode([i])
    if "\ufffd" in text:
        piece = tokenizer.id_to_token(i) or ""
        if piece and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
    return text.encode("utf-8")


def token_string(tokenizer, i: int) -> str:
    """The token's text, or OpenAI's `bytes:\\xNN...` form when it is not whole UTF-8 characters."""
    text = tokenizer.decode([i])
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tokenizer, i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def legacy_logprobs(tokenizer, ids: list[int], logprobs: list, tops: list, start: int = 0) -> dict:
    """The completions API's logprobs of `ids`; `text_offset` counts characters of the returned text
    from `start` (where these tokens' text begins): token j starts at len(decode(ids[:j]))."""
    decoder, offsets = IncrementalDecoder(tokenizer), []
    for i in ids:
        offsets.append(start + len(decoder.text))
        decoder.push(i)
    return {"tokens": [token_string(tokenizer, i) for i in ids], "token_logprobs": list(logprobs),
            "top_logprobs": [None if t is None else {token_string(tokenizer, i): v for i, v in t.items()}
                             for t in tops],
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], logprobs: list, tops: list) -> dict:
    def entry(i: int, value: float) -> dict:
        return {"token": token_string(tokenizer, i), "logprob": value, "bytes": list(token_bytes(tokenizer, i))}

    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top.items()]}
                        for i, lp, top in zip(ids, logprobs, tops, strict=True)]}
