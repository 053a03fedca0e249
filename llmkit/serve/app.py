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
joins a batch, so a bad one never disturbs the others.

Split as vLLM's: the request models own their validation and `to_sampling_params` (schema.py), the
serving layer does each endpoint's work (serving.py: `OpenAIServing`), and this file holds the
middleware, the error handlers and thin routes.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.embeddings import Embedder, load_embedder
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.moderation import Moderator
from llmkit.moderation import load as load_moderator
from llmkit.progress import phase
from llmkit.rag.index import Index
from llmkit.serve.config import ServeConfig
from llmkit.serve.errors import APIError, error_response
from llmkit.serve.scheduler import Overloaded
from llmkit.serve.schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModerationRequest,
    TokenizeRequest,
)
from llmkit.serve.serving import ClientGone, OpenAIServing

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


def create_app(model, tokenizer, config: ServeConfig | None = None, embedder: Embedder | None = None,
               adapters: dict[str, Transformer] | None = None, retriever: Index | None = None,
               moderator: Moderator | None = None) -> FastAPI:
    """The FastAPI app over one `OpenAIServing` (serving.py, which says what the arguments do): its
    scheduler threads start and stop with the app's lifespan; the routes parse a body into its request
    model (schema.py) and call the serving layer; errors of every kind leave in OpenAI's shape."""
    serving = OpenAIServing(model, tokenizer, config or ServeConfig(), embedder, adapters, retriever, moderator)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        serving.start()
        yield
        serving.stop()

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan)
    app.state.serving = serving
    app.add_middleware(BodyLimit, limit=serving.config.max_request_bytes)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts(serving.config), api_key=serving.config.api_key)

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

    # ---- routes --------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return serving.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await serving.chat(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await serving.embeddings(body)

    @app.post("/v1/moderations")
    async def moderations(body: ModerationRequest):
        return await serving.moderations(body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await serving.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return serving.tokenizer_info()

    @app.get("/health")
    async def health():
        return serving.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(serving.metrics.render(), media_type="text/plain; version=0.0.4")

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
