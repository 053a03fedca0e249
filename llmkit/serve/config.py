"""The options of `llmkit serve` (kept apart from the app so the CLI lists them without importing FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ServeConfig:
    """`llmkit serve` options; every field is also a `--flag`."""

    model: str = field(default="", metadata={"help": "an HF folder, a .gguf file or a registry name"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    port: int = 8000
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY'"})
    served_model_name: str | None = field(default=None, metadata={"help": "the model id clients send"})
    kv_budget: int = field(default=32768, metadata={"help": "KV-cache tokens (rows x longest row)"})
    max_rows: int = field(default=64, metadata={"help": "most sequences decoded together"})
    max_waiting: int = field(default=256, metadata={"help": "queued requests before 429"})
    prefill_chunk: int = field(default=512, metadata={
        "help": "most prompt tokens prefilled per step, between decode steps of the running batch"})
    step_seconds: float = field(default=0.5, metadata={
        "help": "while streams are running, a step prefills only what fits in this many seconds at the rate "
                "the prompt's last chunk ran, so a long prompt's later chunks (more keys to attend to) shrink "
                "and no stream waits much longer for its next token (0: the token budget alone)"})
    prefix_cache: int = field(default=4096, metadata={
        "help": "prompt tokens whose keys/values are kept for reuse by prompts that start the same way (0: off)"})
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask"})
    max_request_bytes: int = field(default=4_000_000, metadata={"help": "largest request body"})
    max_logprobs: int = field(default=20, metadata={
        "help": "most logprobs / top_logprobs a request may ask (vLLM's default; OpenAI allows 5 and 20)"})
    max_stops: int = field(default=16, metadata={"help": "most stop strings, and most stop_token_ids, per request"})
    max_stop_chars: int = field(default=256, metadata={"help": "longest stop string"})
    max_logit_bias: int = field(default=300, metadata={"help": "most logit_bias entries per request"})
    allowed_hosts: str | None = field(default=None, metadata={
        "help": "comma-separated Host names accepted, '*' for any (default: the loopback names when bound to "
                "loopback, which stops DNS rebinding; any host otherwise)"})
    quantize: Literal["auto", "none", "int8", "int4"] = field(default="auto", metadata={
        "help": "weight-only packed int8/int4 linear layers for fast CPU decoding; auto: a quantized GGUF runs at "
                "its own bits (Q4_1 -> int4, Q8_0 -> int8) unless --dtype is given, anything else as loaded; none: "
                "as loaded (a GGUF dequantized)"})
    compile: bool = field(default=True, metadata={
        "help": "decode batches of up to 16 rows through torch.compile (compiled before the server listens: "
                "~1-2 min the first time, seconds once inductor's cache holds it; eager if compiling fails)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "weights' and activations' dtype; auto keeps the checkpoint's (float32 for GGUF)"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, mps (default: cpu)"})
    lora_modules: list[str] = field(default_factory=list, metadata={
        "help": "NAME=PATH: serve the base model with this LoRA adapter (an adapter or LoRA run folder) under "
                "the model name NAME too, as vLLM's --lora-modules (repeat the flag for more)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "the longest prompt + reply, in tokens (default: the model's context, max_seq_len); longer "
                "prompts are refused"})
    chat_template: str | None = field(default=None, metadata={
        "help": "replace the model's chat template: chatml, gemma, llama2, alpaca, vicuna, a .jinja file or Jinja"})
    rag: str | None = field(default=None, metadata={
        "help": "a retrieval index folder (`llmkit rag index`): chat completions answer from the passages it "
                "retrieves for the last user message and return them as `sources`, cited by [n]"})
    rag_k: int = field(default=3, metadata={"help": "passages retrieved per chat request with --rag"})
    moderation: str | None = field(default=None, metadata={
        "help": "a moderation folder (`llmkit moderation train`): answers /v1/moderations and checks every "
                "generation; a flagged one is returned with moderation.flagged=true, not dropped"})
