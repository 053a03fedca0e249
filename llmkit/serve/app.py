"""`llmkit serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Routes: GET /v1/models; POST /v1/completions and /v1/chat/completions (JSON or server-sent events);
POST /tokenize, /detokenize and GET /tokenizer_info (vLLM's, which lm-eval's remote tokenizer
uses); GET /health; GET /metrics (Prometheus text); GET / (the chat page in static/).

Safe by default: it binds 127.0.0.1, `api_key` protects everything under /v1 and the tokenizer
routes (Bearer), request bodies and max_tokens have limits, and every error is OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`: 400 for an invalid field, 401 for a bad key,
404 for an unknown model or route, 413 for a body over the limit, 429 with Retry-After when the
queue is full. A request that fails never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from functools import partial
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import ConfigError
from llmkit.generate.chat import end_of_turn_ids
from llmkit.generate.sampling import SamplingParams
from llmkit.serve.config import ServeConfig
from llmkit.serve.scheduler import Overloaded, Scheduler
from llmkit.serve.schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    chat_logprobs,
    legacy_logprobs,
)

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def _config_error(e: ConfigError) -> APIError:
    """SamplingParams names the field first ("top_p=2 is invalid; ..."): that is the param."""
    message = str(e).replace("max_new_tokens", "max_tokens")
    match = re.match(r"(\w+)=", message)
    return APIError(400, message, param=match.group(1) if match else None)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before the app parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                response = error_response(APIError(413, f"the request body is over {self.limit} bytes",
                                                   code="request_too_large"))
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
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


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app; its scheduler thread starts and stops with the app's lifespan."""
    config = config or ServeConfig()
    name = config.served_model_name or config.model or "llmkit"
    context = model.config.max_seq_len
    scheduler = Scheduler(model, tokenizer, kv_budget=config.kv_budget, max_rows=config.max_rows,
                          max_waiting=config.max_waiting)
    chat_stops = end_of_turn_ids(tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)

    # ---- errors ----------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(ConfigError)
    async def _bad_value(request, e: ConfigError):
        return error_response(_config_error(e))

    @app.exception_handler(Overloaded)
    async def _overloaded(request, e: Overloaded):
        return error_response(APIError(429, str(e), type="rate_limit_exceeded", code="rate_limit_exceeded",
                                       headers={"Retry-After": str(e.retry_after)}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error_response(APIError(400, f"{param or 'body'}: {err.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error"))

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    # ---- building the sampling parameters ----------------------------------------------------------
    def check_model(body: SamplingFields) -> None:
        if body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {name!r}",
                           param="model", type="not_found_error", code="model_not_found")

    def params_of(body: SamplingFields, prompts: list[list[int]], default_max: int | None, **extra) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                                f"{longest} tokens; shorten it (at most {context - 1})", param="prompt",
                           code="context_length_exceeded")
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max
        if max_tokens is None:
            max_tokens = min(config.max_tokens_limit, context - longest)
        if isinstance(max_tokens, int) and max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is over this server's limit of {config.max_tokens_limit}",
                           param="max_tokens")
        if body.n < 1 or body.n * len(prompts) > config.max_rows:
            raise APIError(400, f"n={body.n} with {len(prompts)} prompt(s) asks for {body.n * len(prompts)} "
                                f"sequences; expected 1 to {config.max_rows}", param="n")
        if body.seed is not None and not -(2 ** 63) <= body.seed <= 2 ** 63 - 1 - body.n:
            raise APIError(400, f"seed={body.seed} is out of range; expected a 64-bit integer", param="seed")
        # values so extreme that the logits overflow to inf would fail sampling: refuse them up front
        if 0 < body.temperature < 1e-5:
            raise APIError(400, f"temperature={body.temperature} is too small to sample with; expected 0 (greedy) "
                                "or at least 1e-5", param="temperature")
        if body.repetition_penalty > 0 and not 0.01 <= body.repetition_penalty <= 100:
            raise APIError(400, f"repetition_penalty={body.repetition_penalty}; expected 0.01 to 100 (1 disables it)",
                           param="repetition_penalty")
        vocab = model.config.vocab_size
        for key in body.logit_bias or {}:
            if not key.isdigit() or int(key) >= vocab:
                raise APIError(400, f"logit_bias has token {key!r}; expected token ids in [0, {vocab})",
                               param="logit_bias")
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=0 if body.top_k == -1 else body.top_k, min_p=body.min_p,
                              frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                              repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias,
                              stop=body.stop, seed=body.seed, n=body.n, min_tokens=body.min_tokens,
                              ignore_eos=body.ignore_eos,
                              stop_token_ids=extra.pop("stop_token_ids", body.stop_token_ids), **extra)

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
            ids = tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a prompt has no tokens; expected at least one", param="prompt")
            bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, "
                                    f"{model.config.vocab_size})", param="prompt")
            out.append(ids)
        return out

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

    async def collect(job: Job) -> None:
        try:
            async for _ in job.chunks():
                pass
        finally:
            job.cancel()

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "llmkit", "max_model_len": context}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest):
        check_model(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported (no fill-in-the-middle)", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, f"best_of={body.best_of} is not supported; expected it unset or equal to n",
                           param="best_of")
        if body.echo and body.stream:
            raise APIError(400, "echo cannot be combined with stream", param="echo")
        prompts = encode_prompts(body.prompt)
        params = params_of(body, prompts, 16, logprobs=body.logprobs, echo=body.echo)
        job = Job(scheduler, prompts, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        k = body.logprobs
        n = params.n
        if body.stream:
            sent: dict[int, int] = {}  # characters streamed per choice (for text_offset)

            def frame(p, chunk):
                index = p * n + chunk.index
                logprobs = None
                if k is not None:
                    logprobs = legacy_logprobs(tokenizer, [chunk.token_id], [chunk.logprob], [chunk.top_logprobs],
                                               sent.get(index, 0))
                sent[index] = sent.get(index, 0) + len(chunk.text)
                yield {**head, "choices": [{"index": index, "text": chunk.text, "logprobs": logprobs,
                                            "finish_reason": chunk.finish_reason}]}

            frame.head = head
            return stream(job, body, frame)
        await collect(job)
        choices = []
        for p, request in enumerate(job.requests):
            echoed = tokenizer.decode(request.prompt) if body.echo else ""  # what text_offset counts from
            for c in request.completions:
                text = echoed + c.text
                logprobs = None
                if k is not None:
                    ids, lps, tops = list(c.token_ids), list(c.logprobs), list(c.top_logprobs)
                    if body.echo:
                        ids = request.prompt + ids
                        lps = c.prompt_logprobs + lps
                        tops = c.prompt_top_logprobs + tops
                    logprobs = legacy_logprobs(tokenizer, ids, lps, tops)
                choices.append({"index": p * n + c.index, "text": text, "logprobs": logprobs,
                                "finish_reason": c.finish_reason})
        return {**head, "choices": choices, "usage": usage(job)}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatRequest):
        check_model(body)
        if not body.messages:
            raise APIError(400, "messages is empty; expected at least one message", param="messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs={body.top_logprobs}; expected 0 to 20", param="top_logprobs")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids, _ = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template may raise on roles it does not know
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        if not ids:
            raise APIError(400, "the rendered chat has no tokens", param="messages")
        stops = sorted({*chat_stops, *(body.stop_token_ids or [])})
        params = params_of(body, [ids], None, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                           stop_token_ids=stops)
        job = Job(scheduler, [ids], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            started: set[int] = set()
            chunk_head = {**head, "object": "chat.completion.chunk"}

            def frame(p, chunk):
                if chunk.index not in started:
                    started.add(chunk.index)
                    yield {**chunk_head, "choices": [{"index": chunk.index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]}
                logprobs = None
                if body.logprobs:
                    logprobs = chat_logprobs(tokenizer, [chunk.token_id], [chunk.logprob], [chunk.top_logprobs])
                delta = {"content": chunk.text} if chunk.text or not chunk.finish_reason else {}
                yield {**chunk_head, "choices": [{"index": chunk.index, "delta": delta, "logprobs": logprobs,
                                                  "finish_reason": chunk.finish_reason}]}

            frame.head = chunk_head
            return stream(job, body, frame)
        await collect(job)
        choices = []
        for c in job.completions:
            logprobs = chat_logprobs(tokenizer, c.token_ids, c.logprobs, c.top_logprobs) if body.logprobs else None
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**head, "choices": choices, "usage": usage(job)}

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids, _ = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": context, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
                           param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info", dependencies=[Depends(check_key)])
    async def tokenizer_info():
        def token(i):
            return tokenizer.id_to_token(i) if i is not None else None

        return {"tokenizer_class": "llmkit.Tokenizer", "vocab_size": tokenizer.vocab_size,
                "bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
                "pad_token": token(tokenizer.pad_id), "chat_template": tokenizer.chat_template,
                "model_max_length": context}

    @app.get("/health")
    async def health():
        alive = scheduler.thread is not None and scheduler.thread.is_alive()
        if not alive:
            raise APIError(503, "the scheduler is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

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
    model, tokenizer = load(config.model, config.quantize, config.threads, config.chat_template, config.dtype,
                            config.device)
    if config.served_model_name is None:
        config.served_model_name = Path(config.model).name if Path(config.model).exists() else config.model
    app = create_app(model, tokenizer, config)
    print(f"serving {config.served_model_name} on http://{config.host}:{config.port} (chat page at /)", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


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
