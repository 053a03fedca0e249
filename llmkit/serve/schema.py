"""The OpenAI request bodies (pydantic, so FastAPI publishes them in its OpenAPI schema) and the
logprob shapes of the responses: the legacy completions one (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and the chat one (`content: [{token, logprob, bytes, top_logprobs}]`).

Extra fields are ignored, as OpenAI and vLLM ignore them. vLLM's extensions (top_k, min_p,
repetition_penalty, min_tokens, stop_token_ids, ignore_eos) are accepted with vLLM's meaning.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from llmkit.tokenizer import gpt2_byte_decoder

_BYTE_OF = gpt2_byte_decoder()


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
    from `start` (where these tokens' text begins)."""
    offsets = [start + len(tokenizer.decode(ids[:j])) for j in range(len(ids))]
    return {"tokens": [token_string(tokenizer, i) for i in ids], "token_logprobs": list(logprobs),
            "top_logprobs": [None if t is None else {token_string(tokenizer, i): v for i, v in t.items()}
                             for t in tops],
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], logprobs: list, tops: list) -> dict:
    def entry(i: int, value: float) -> dict:
        return {"token": token_string(tokenizer, i), "logprob": value, "bytes": list(token_bytes(tokenizer, i))}

    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top.items()]}
                        for i, lp, top in zip(ids, logprobs, tops, strict=True)]}
