"""`llmkit serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Routes: GET /v1/models; POST /v1/completions and /v1/chat/completions (JSON or server-sent events);
POST /tokenize, /detokenize and GET /tokenizer_info (vLLM's, which lm-eval's remote tokenizer
uses); GET /health; GET /metrics (Prometheus text); GET / (the chat page in static/).

Safe by default: it binds 127.0.0.1 and then answers only requests whose Host is a loopback name
(no DNS rebinding); `api_key` protects every route but /health and the chat page (metrics and the
OpenAPI docs included); request bodies and every field have limits (ServeConfig); and every error
is OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for an invalid field, 401
for a bad key, 404 for an unknown model or route, 413 for a body over the limit, 421 for a foreign
Host, 429 with Retry-After when the queue is full. A request is validated completely before it
joins a batch, so a bad one never disturbs the others; tokenizing, chat templates and building
large responses run off the event loop, so /health and streams stay live; a client that goes away,
streaming or not, frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.embeddings import Embedder, load_embedder
from llmkit.errors import ConfigError
from llmkit.generate.chat import end_of_turn_ids
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.moderation import Moderator
from llmkit.moderation import load as load_moderator
from llmkit.progress import phase
from llmkit.rag.ask import cited, grounded_messages, last_user_text, numbered
from llmkit.rag.index import Index
from llmkit.serve.config import ServeConfig
from llmkit.serve.errors import APIError, error_response
from llmkit.serve.metrics import Metrics
from llmkit.serve.scheduler import Overloaded, Scheduler
from llmkit.serve.schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModerationRequest,
    SamplingFields,
    TokenizeRequest,
    chat_logprobs,
    chat_messages,
    legacy_logprobs,
)

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/")  # answered without the API key
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class Guard:
    """ASGI middleware: the Host header must be one this server answers to, and every path but
    OPEN_PATHS needs the API key when one is set (FastAPI's own /docs and /openapi.json included)."""

    def __init__(self, app, allowed_hosts: set[str] | None, api_key: str | None):
        self.app, self.allowed_hosts, self.api_key = app, allowed_hosts, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = None
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host if host.endswith("]") or ":" not in host else host.rsplit(":", 1)[0]
            if name.lower() not in self.allowed_hosts:
                error = APIError(421, f"the Host header {host[:100]!r} is not one this server answers to "
                                      f"({', '.join(sorted(self.allowed_hosts))}); see --allowed-hosts",
                                 code="host_not_allowed")
        if error is None and self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                                 type="authentication_error", code="invalid_api_key")
        if error is not None:
            return await error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)


def allowed_hosts(config: ServeConfig) -> set[str] | None:
    """--allowed-hosts, or the loopback names when bound to loopback (None: any host)."""
    if config.allowed_hosts:
        names = {h.strip().lower() for h in config.allowed_hosts.split(",") if h.strip()}
        return None if "*" in names else names
    return set(LOOPBACK) if config.host in LOOPBACK else None


def param_of(loc) -> str | None:
    """A pydantic error location as OpenAI's `param` ("messages.0.content"): the union tags pydantic
    adds ("str", "list[int]") are not fields."""
    parts = [str(x) for x in loc if x != "body"]
    return ".".join(p for p in parts if "[" not in p and p not in {"str", "int", "float", "bool", "list", "dict"}) or None


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before the app parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                response = error_response(APIError(413, f"the request body is over {self.limit} bytes",
                                                   code="request_too_large"))
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # later reads wait for the client's disconnect

        await self.app(scope, replay, send)


class Job:
    """The scheduler requests of one HTTP request (one per prompt) as an async stream of (prompt, Chunk)."""

    def __init__(self, scheduler: Scheduler, prompts: list[list[int]], params: SamplingParams):
        self.scheduler, self.queue = scheduler, asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.requests = []
        try:
            for p, ids in enumerate(prompts):
                self.requests.append(scheduler.submit(ids, params, partial(self._put, loop, p)))
        except Exception:
            self.cancel()
            raise
        self.open = len(prompts)

    def _put(self, loop, p, item) -> None:  # called on the scheduler thread
        loop.call_soon_threadsafe(self.queue.put_nowait, (p, item))

    async def chunks(self):
        while self.open:
            p, item = await self.queue.get()
            if item is None:
                self.open -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield p, item

    def cancel(self) -> None:
        for r in self.requests:
            self.scheduler.cancel(r)

    @property
    def completions(self):
        return [c for r in self.requests for c in r.completions]


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(model, tokenizer, config: ServeConfig | None = None, embedder: Embedder | None = None,
               adapters: dict[str, Transformer] | None = None, retriever: Index | None = None,
               moderator: Moderator | None = None) -> FastAPI:
    """The FastAPI app; its scheduler threads start and stop with the app's lifespan. An encoder
    (causal=False) answers /v1/embeddings (through `embedder`, or pooling as its config says) and
    refuses the generating routes. `adapters` are models served under names of their own
    (`--lora-modules`: the base with a LoRA adapter merged), each with its own scheduler and the same
    tokenizer and limits. With a `retriever` (`--rag`), chat completions answer from the passages it
    retrieves for the last user message: the response carries them as `sources` (numbered as the
    prompt numbers them) and each message the numbers it cites (`citations`)."""
    config = config or ServeConfig()
    if not model.config.causal and embedder is None:
        embedder = Embedder(model, tokenizer, model.config.pooling, False, model.config.max_seq_len)
    name = config.served_model_name or config.model or "llmkit"
    context, vocab = model.config.max_seq_len, model.config.vocab_size
    counts = Metrics()  # one set of counters and histograms for every served model
    schedulers = {served: Scheduler(m, tokenizer, kv_budget=config.kv_budget, max_rows=config.max_rows,
                                    max_waiting=config.max_waiting, prefill_chunk=config.prefill_chunk,
                                    step_seconds=config.step_seconds,
                                    prefix_cache=config.prefix_cache, metrics=counts, compile=config.compile)
                  for served, m in {name: model, **(adapters or {})}.items()}
    scheduler = schedulers[name]
    counts.gauges.update({  # over every served model (each scheduler set its own)
        "num_requests_running": lambda: sum(len(s.running) + len(s.filling) for s in schedulers.values()),
        "num_requests_waiting": lambda: sum(len(s.waiting) for s in schedulers.values()),
        "kv_cache_usage_perc": lambda: sum(s.kv_usage() for s in schedulers.values()) / len(schedulers)})
    chat_stops = end_of_turn_ids(tokenizer)
    # No token covers more characters than the longest in the vocabulary (twice that allows for
    # normalizers that merge characters), so a longer text is over the context without tokenizing it.
    most_chars = 2 * context * max(map(len, tokenizer.backend.get_vocab()))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for s in schedulers.values():
            s.start()
        yield
        for s in schedulers.values():
            s.stop()

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan)
    app.state.scheduler, app.state.schedulers = scheduler, schedulers
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts(config), api_key=config.api_key)

    # ---- errors ----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(ConfigError)
    async def _bad_value(request, e: ConfigError):
        return error_response(APIError(400, str(e), param=e.param))

    @app.exception_handler(Overloaded)
    async def _overloaded(request, e: Overloaded):
        return error_response(APIError(429, str(e), type="rate_limit_exceeded", code="rate_limit_exceeded",
                                       headers={"Retry-After": str(e.retry_after)}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        param = param_of(err.get("loc", ()))
        return error_response(APIError(400, f"{param or 'body'}: {err.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(ClientGone)
    async def _gone(request, e: ClientGone):
        return PlainTextResponse("", status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error"))

    # ---- from a request to scheduler requests -------------------------------------------------------
    def check_model(body: SamplingFields | EmbeddingRequest, generates: bool = True) -> Scheduler:
        """The scheduler of the model the request names (the base, or a LoRA module)."""
        if generates and embedder is not None:
            raise APIError(400, f"{name!r} is an encoder: it cannot generate text; this server answers "
                                "/v1/embeddings", param="model", code="model_not_supported")
        if not generates and embedder is None:
            raise APIError(400, f"{name!r} is a decoder; /v1/embeddings needs an encoder (causal=False) such as "
                                "all-minilm-l6-v2", param="model", code="model_not_supported")
        if body.model not in schedulers:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, schedulers))}", param="model", type="not_found_error",
                           code="model_not_found")
        return schedulers[body.model]

    def encode(text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize (on a worker thread: see `offload`) after a length check that needs no tokenizing."""
        if len(text) > most_chars:
            raise APIError(400, f"{param} has {len(text)} characters, more than any text that fits this model's "
                                f"context of {context} tokens", param=param, code="context_length_exceeded")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_prompts(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty; expected text, token ids, or a list of either", param="prompt")
        out = []
        for p in prompts:
            ids = encode(p, "prompt") if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a prompt has no tokens; expected at least one", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def encode_chat(messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            text = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template may raise on roles it does not know
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        ids = encode(text, "messages", add_special_tokens=False)
        if not ids:
            raise APIError(400, "the rendered chat has no tokens", param="messages")
        return ids

    def ground(messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """The chat with the last user turn replaced by the retrieved passages and its question, and the passages."""
        if messages[-1].get("role") != "user":
            raise APIError(400, "with --rag the last message must be the user's question", param="messages")
        question = last_user_text(messages)
        sources = numbered(retriever.search(question, config.rag_k))
        return grounded_messages(question, sources, messages[:-1]), sources

    def moderated(text: str) -> dict:
        """{"moderation": {flagged, categories flagged}} for a generated text with --moderation; {} without."""
        if moderator is None:
            return {}
        (result,) = moderator.moderate([text])
        return {"moderation": {"flagged": result["flagged"],
                               "categories": [c for c, on in result["categories"].items() if on]}}

    async def offload(fn, *args, **kwargs):
        """CPU work (tokenizing, templates, large responses) runs on a worker thread, not the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    async def respond(build) -> JSONResponse:
        """`build()`'s answer, built and serialized to JSON off the event loop (an 8,000-token echo
        with top logprobs is megabytes of JSON)."""
        return await offload(lambda: JSONResponse(build()))

    def usage(job: Job) -> dict:
        prompt = sum(len(r.prompt) for r in job.requests)
        completion = sum(len(c.token_ids) for c in job.completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream(job: Job, body: SamplingFields, frame) -> StreamingResponse:
        """Server-sent events: `frame(p, chunk)` for each token, usage last when asked, then [DONE]."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                async for p, chunk in job.chunks():
                    for event in frame(p, chunk):
                        if include_usage:
                            event["usage"] = None
                        yield sse(event)
                if include_usage:
                    yield sse({**frame.head, "choices": [], "usage": usage(job)})
            except Exception as e:  # noqa: BLE001 - the status line is sent already: report it in the stream
                yield sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "internal_error",
                                     "param": None, "code": None}})
            finally:
                job.cancel()  # a client that went away frees its rows (no-op when finished)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(job: Job, request: Request) -> None:
        """Wait for every row; a client that disconnects first cancels the job (rows free at the next step)."""
        async def drain():
            async for _ in job.chunks():
                pass

        done = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                raise ClientGone()
            done.result()
        finally:
            done.cancel()
            gone.cancel()
            job.cancel()

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": served, "object": "model", "created": int(time.time()), "owned_by": "llmkit",
             "max_model_len": context, **({} if served == name else {"parent": name})} for served in schedulers]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        scheduler = check_model(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, f"best_of={body.best_of} is not supported; expected it unset or equal to n",
                           param="best_of")
        if body.echo and body.stream:
            raise APIError(400, "echo cannot be combined with stream", param="echo")
        prompts = await offload(encode_prompts, body.prompt)
        params = body.to_sampling_params(config, vocab, context, prompts, 16, logprobs=body.logprobs, echo=body.echo)
        job = Job(scheduler, prompts, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        k = body.logprobs
        n = params.n
        if body.stream:
            sent: dict[int, int] = {}  # characters streamed per choice (for text_offset)
            texts: dict[int, str] = {}  # the text so far per choice (for --moderation's verdict at its end)

            def frame(p, chunk):
                index = p * n + chunk.index
                logprobs = None
                if k is not None:
                    logprobs = legacy_logprobs(tokenizer, [chunk.token_id], [chunk.logprob], [chunk.top_logprobs],
                                               sent.get(index, 0))
                sent[index] = sent.get(index, 0) + len(chunk.text)
                texts[index] = texts.get(index, "") + chunk.text
                verdict = moderated(texts[index]) if chunk.finish_reason else {}  # on the whole text, at its end
                yield {**head, "choices": [{"index": index, "text": chunk.text, "logprobs": logprobs,
                                            "finish_reason": chunk.finish_reason, **verdict}]}

            frame.head = head
            return stream(job, body, frame)
        await collect(job, request)

        def answer() -> dict:
            choices = []
            for p, r in enumerate(job.requests):
                echoed = tokenizer.decode(r.prompt) if body.echo else ""  # what text_offset counts from
                for c in r.completions:
                    logprobs = None
                    if k is not None:
                        ids, lps, tops = list(c.token_ids), list(c.logprobs), list(c.top_logprobs)
                        if body.echo:
                            ids, lps, tops = r.prompt + ids, c.prompt_logprobs + lps, c.prompt_top_logprobs + tops
                        logprobs = legacy_logprobs(tokenizer, ids, lps, tops)
                    choices.append({"index": p * n + c.index, "text": echoed + c.text, "logprobs": logprobs,
                                    "finish_reason": c.finish_reason, **moderated(c.text)})
            return {**head, "choices": choices, "usage": usage(job)}

        return await respond(answer)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        scheduler = check_model(body)
        if not body.messages:
            raise APIError(400, "messages is empty; expected at least one message", param="messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= min(20, config.max_logprobs):
            raise APIError(400, f"top_logprobs={body.top_logprobs}; expected 0 to {min(20, config.max_logprobs)}",
                           param="top_logprobs")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        messages, sources = chat_messages(body.messages), None
        if retriever is not None:
            messages, sources = await offload(ground, messages)
        ids = await offload(encode_chat, messages)
        params = body.to_sampling_params(config, vocab, context, [ids], None,
                                         logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                         stop_token_ids=sorted({*chat_stops, *(body.stop_token_ids or [])}))
        job = Job(scheduler, [ids], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, **({} if sources is None else {"sources": sources})}
        if body.stream:
            started: set[int] = set()
            texts: dict[int, str] = {}
            chunk_head = {k: v for k, v in head.items() if k != "sources"} | {"object": "chat.completion.chunk"}

            def frame(p, chunk):
                if chunk.index not in started:  # the sources come once, with a choice's first chunk
                    started.add(chunk.index)
                    yield {**chunk_head, **({} if sources is None else {"sources": sources}),
                           "choices": [{"index": chunk.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
                logprobs = None
                if body.logprobs:
                    logprobs = chat_logprobs(tokenizer, [chunk.token_id], [chunk.logprob], [chunk.top_logprobs])
                delta = {"content": chunk.text} if chunk.text or not chunk.finish_reason else {}
                texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
                verdict = moderated(texts[chunk.index]) if chunk.finish_reason else {}  # on the whole reply, at its end
                yield {**chunk_head, "choices": [{"index": chunk.index, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": chunk.finish_reason, **verdict}]}

            frame.head = chunk_head
            return stream(job, body, frame)
        await collect(job, request)

        def answer() -> dict:
            choices = []
            for c in job.completions:
                logprobs = chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs) if body.logprobs else None
                message = {"role": "assistant", "content": c.text}
                if sources is not None:
                    message["citations"] = [p["n"] for p in cited(c.text, sources)]
                choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, **moderated(c.text)})
            return {**head, "choices": choices, "usage": usage(job)}

        return await respond(answer)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body, generates=False)
        items = body.inputs()
        if body.dimensions not in (None, embedder.dim):
            raise APIError(400, f"dimensions={body.dimensions}; this model's embeddings have {embedder.dim}",
                           param="dimensions")

        def answer() -> dict:
            rows = [embedder.encode([t])[0] if isinstance(t, str) else list(t) for t in items]
            bad = [t for r in rows for t in r if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"input token id {bad[0]} is outside the vocabulary [0, {vocab})", param="input")
            if any(len(r) > embedder.max_length for r in rows):
                raise APIError(400, f"an input is longer than this model's {embedder.max_length} tokens",
                               param="input", code="context_length_exceeded")
            vectors = embedder.embed_ids(rows).numpy()
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                     if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
            tokens = sum(map(len, rows))
            return {"object": "list", "data": data, "model": name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return await respond(answer)

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest):
        if moderator is None:
            raise APIError(404, "this server has no moderation model; start it with --moderation FOLDER "
                                "(`llmkit moderation train FOLDER`)", type="not_found_error", code="model_not_found")
        texts = body.texts()
        return await respond(lambda: {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or "llmkit-moderation",
                                      "results": moderator.moderate(texts)})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = await offload(encode_chat, chat_messages(body.messages), body.add_generation_prompt)
        else:
            ids = await offload(encode, body.prompt, "prompt", body.add_special_tokens)
        return await respond(lambda: {"count": len(ids), "max_model_len": context, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                           param="tokens")
        return await respond(lambda: {"prompt": tokenizer.decode(body.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        def token(i):
            return tokenizer.id_to_token(i) if i is not None else None

        return {"tokenizer_class": "llmkit.Tokenizer", "vocab_size": tokenizer.vocab_size,
                "bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
                "pad_token": token(tokenizer.pad_id), "chat_template": tokenizer.chat_template,
                "model_max_length": context}

    @app.get("/health")
    async def health():
        alive = all(s.thread is not None and s.thread.is_alive() for s in schedulers.values())
        if not alive:
            raise APIError(503, "the scheduler is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(counts.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    return app


def serve(config: ServeConfig) -> None:
    """Load the model and run the server until interrupted."""
    import uvicorn

    from llmkit.generate.chat import load

    if not config.model:
        raise ConfigError("serve needs a model: an HF folder, a .gguf file or a registry name")
    modules = lora_modules(config.lora_modules)
    with phase(f"load {config.model}"):
        model, tokenizer = load(config.model, config.quantize, config.threads, config.chat_template, config.dtype,
                                config.device, config.max_model_len)
    embedder = None
    if not model.config.causal:  # an encoder: pooled and normalised as its sentence-transformers files say
        embedder = load_embedder(config.model, config.device)
        model, tokenizer = embedder.model, embedder.tokenizer
    adapters = {}
    for module, path in modules.items():
        with phase(f"load the LoRA module {module} ({path})"):
            adapters[module] = load(config.model, config.quantize, None, None, config.dtype, config.device,
                                    config.max_model_len, adapter=path)[0]
    if config.served_model_name is None:
        config.served_model_name = Path(config.model).name if Path(config.model).exists() else config.model
    retriever = None
    if config.rag:
        with phase(f"load the retrieval index {config.rag}"):
            retriever = Index.load(config.rag)
    moderator = None
    if config.moderation:
        with phase(f"load the moderation model {config.moderation}"):
            moderator = load_moderator(config.moderation)
    with phase("compile the decode step (torch.compile; --compile false skips it)" if config.compile else "start"):
        app = create_app(model, tokenizer, config, embedder, adapters, retriever, moderator)
    print(f"serving {config.served_model_name} on http://{config.host}:{config.port} (chat page at /)", flush=True)
    handler = logging.StreamHandler()  # a line per finished request, as vLLM and llama.cpp's server log them
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("llmkit.serve").addHandler(handler)
    logging.getLogger("llmkit.serve").setLevel(logging.INFO)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


def lora_modules(specs: list[str]) -> dict[str, str]:
    """`--lora-modules NAME=PATH ...` as {NAME: PATH}, every one checked before anything loads."""
    modules = {}
    for spec in specs:
        module, sep, path = spec.partition("=")
        if not sep or not module or not path:
            raise ConfigError(f"--lora-modules {spec!r}; expected NAME=PATH (a LoRA adapter or LoRA run folder)")
        if module in modules:
            raise ConfigError(f"--lora-modules names {module!r} twice; expected one path per name")
        if not Path(path).is_dir():
            raise ConfigError(f"--lora-modules {module}={path}: no such folder")
        modules[module] = path
    return modules


@contextlib.contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` with uvicorn on a thread (port 0: any free port); yields its base URL. For tests,
    benchmarks and notebooks."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
