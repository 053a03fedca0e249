"""The serving layer (vLLM's OpenAIServing*): what each endpoint does with a request whose body the
request models (schema.py) have validated. `OpenAIServing` holds the served models' schedulers, the
tokenizer and the limits; it turns a request into scheduler requests (`Job`), and their chunks into
OpenAI's responses or server-sent events. The app's routes (app.py) only call it.

Tokenizing, chat templates and building large responses run off the event loop (`offload`), so
/health and streams stay live; a client that goes away, streaming or not, frees its rows at the next
step (`stream`, `collect`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from functools import partial

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmkit.embeddings import Embedder
from llmkit.generate.api import prompt_ids
from llmkit.generate.chat import end_of_turn_ids
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.moderation import Moderator
from llmkit.rag.ask import cited, grounded_messages, last_user_text, numbered
from llmkit.rag.index import Index
from llmkit.serve.config import ServeConfig
from llmkit.serve.errors import APIError
from llmkit.serve.metrics import Metrics
from llmkit.serve.scheduler import Scheduler
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

    def usage(self) -> dict:
        prompt = sum(len(r.prompt) for r in self.requests)
        completion = sum(len(c.token_ids) for c in self.completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def offload(fn, *args, **kwargs):
    """CPU work (tokenizing, templates, large responses) runs on a worker thread, not the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


async def respond(build) -> JSONResponse:
    """`build()`'s answer, built and serialized to JSON off the event loop (an 8,000-token echo with
    top logprobs is megabytes of JSON)."""
    return await offload(lambda: JSONResponse(build()))


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
                yield sse({**frame.head, "choices": [], "usage": job.usage()})
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


class OpenAIServing:
    """The served models and what every endpoint does. An encoder (causal=False) answers
    /v1/embeddings (through `embedder`, or pooling as its config says) and refuses the generating
    routes. `adapters` are models served under names of their own (`--lora-modules`: the base with a
    LoRA adapter merged), each with its own scheduler and the same tokenizer and limits. With a
    `retriever` (`--rag`), chat completions answer from the passages it retrieves for the last user
    message: the response carries them as `sources` (numbered as the prompt numbers them) and each
    message the numbers it cites (`citations`). With a `moderator`, every generation carries its
    verdict (flagged, never dropped) and /v1/moderations answers."""

    def __init__(self, model: Transformer, tokenizer, config: ServeConfig, embedder: Embedder | None = None,
                 adapters: dict[str, Transformer] | None = None, retriever: Index | None = None,
                 moderator: Moderator | None = None):
        if not model.config.causal and embedder is None:
            embedder = Embedder(model, tokenizer, model.config.pooling, False, model.config.max_seq_len)
        self.tokenizer, self.config, self.embedder = tokenizer, config, embedder
        self.retriever, self.moderator = retriever, moderator
        self.name = config.served_model_name or config.model or "llmkit"
        self.context, self.vocab = model.config.max_seq_len, model.config.vocab_size
        self.metrics = Metrics()  # one set of counters and histograms for every served model
        self.schedulers = {
            served: Scheduler(m, tokenizer, kv_budget=config.kv_budget, max_rows=config.max_rows,
                              max_waiting=config.max_waiting, prefill_chunk=config.prefill_chunk,
                              step_seconds=config.step_seconds, prefix_cache=config.prefix_cache,
                              metrics=self.metrics, compile=config.compile)
            for served, m in {self.name: model, **(adapters or {})}.items()}
        schedulers = self.schedulers.values()
        self.metrics.gauges.update({  # over every served model (each scheduler set its own)
            "num_requests_running": lambda: sum(len(s.running) + len(s.filling) for s in schedulers),
            "num_requests_waiting": lambda: sum(len(s.waiting) for s in schedulers),
            "kv_cache_usage_perc": lambda: sum(s.kv_usage() for s in schedulers) / len(schedulers)})
        self.chat_stops = end_of_turn_ids(tokenizer)
        # No token covers more characters than the longest in the vocabulary (twice that allows for
        # normalizers that merge characters), so a longer text is over the context without tokenizing it.
        self.most_chars = 2 * self.context * max(map(len, tokenizer.backend.get_vocab()))

    def start(self) -> None:
        for s in self.schedulers.values():
            s.start()

    def stop(self) -> None:
        for s in self.schedulers.values():
            s.stop()

    # ---- from a request to scheduler requests -------------------------------------------------
    def scheduler_of(self, body: SamplingFields | EmbeddingRequest, generates: bool = True) -> Scheduler:
        """The scheduler of the model the request names (the base, or a LoRA module)."""
        if generates and self.embedder is not None:
            raise APIError(400, f"{self.name!r} is an encoder: it cannot generate text; this server answers "
                                "/v1/embeddings", param="model", code="model_not_supported")
        if not generates and self.embedder is None:
            raise APIError(400, f"{self.name!r} is a decoder; /v1/embeddings needs an encoder (causal=False) such "
                                "as all-minilm-l6-v2", param="model", code="model_not_supported")
        if body.model not in self.schedulers:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.schedulers))}", param="model", type="not_found_error",
                           code="model_not_found")
        return self.schedulers[body.model]

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize (on a worker thread: see `offload`) after a length check that needs no tokenizing."""
        if len(text) > self.most_chars:
            raise APIError(400, f"{param} has {len(text)} characters, more than any text that fits this model's "
                                f"context of {self.context} tokens", param=param, code="context_length_exceeded")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_prompts(self, prompt) -> list[list[int]]:
        """The completions API's `prompt` as token id lists, as `llmkit.generate` reads its prompts."""
        prompts, _ = prompt_ids(self.tokenizer, prompt, encode=lambda text: self.encode(text, "prompt"))
        for ids in prompts:
            if not ids:
                raise APIError(400, "a prompt has no tokens; expected at least one", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab})",
                               param="prompt")
        return prompts

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            text = self.tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # a template may raise on roles it does not know
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        ids = self.encode(text, "messages", add_special_tokens=False)
        if not ids:
            raise APIError(400, "the rendered chat has no tokens", param="messages")
        return ids

    def ground(self, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """The chat with the last user turn replaced by the retrieved passages and its question, and the passages."""
        if messages[-1].get("role") != "user":
            raise APIError(400, "with --rag the last message must be the user's question", param="messages")
        question = last_user_text(messages)
        sources = numbered(self.retriever.search(question, self.config.rag_k))
        return grounded_messages(question, sources, messages[:-1]), sources

    def moderated(self, text: str) -> dict:
        """{"moderation": {flagged, categories flagged}} for a generated text with --moderation; {} without."""
        if self.moderator is None:
            return {}
        (result,) = self.moderator.moderate([text])
        return {"moderation": {"flagged": result["flagged"],
                               "categories": [c for c, on in result["categories"].items() if on]}}

    # ---- the endpoints --------------------------------------------------------------------------
    def models(self) -> dict:
        return {"object": "list", "data": [
            {"id": served, "object": "model", "created": int(time.time()), "owned_by": "llmkit",
             "max_model_len": self.context, **({} if served == self.name else {"parent": self.name})}
            for served in self.schedulers]}

    async def completion(self, body: CompletionRequest, request: Request):
        scheduler = self.scheduler_of(body)
        body.check()
        prompts = await offload(self.encode_prompts, body.prompt)
        params = body.to_sampling_params(self.config, self.vocab, self.context, prompts, 16, logprobs=body.logprobs,
                                         echo=body.echo)
        job = Job(scheduler, prompts, params)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        tokenizer, k, n = self.tokenizer, body.logprobs, params.n
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
                verdict = self.moderated(texts[index]) if chunk.finish_reason else {}  # the whole text, at its end
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
                                    "finish_reason": c.finish_reason, **self.moderated(c.text)})
            return {**head, "choices": choices, "usage": job.usage()}

        return await respond(answer)

    async def chat(self, body: ChatRequest, request: Request):
        scheduler = self.scheduler_of(body)
        body.check(self.config)
        messages, sources = chat_messages(body.messages), None
        if self.retriever is not None:
            messages, sources = await offload(self.ground, messages)
        ids = await offload(self.encode_chat, messages)
        params = body.to_sampling_params(self.config, self.vocab, self.context, [ids], None,
                                         logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                         stop_token_ids=sorted({*self.chat_stops, *(body.stop_token_ids or [])}))
        job = Job(scheduler, [ids], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, **({} if sources is None else {"sources": sources})}
        tokenizer = self.tokenizer
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
                verdict = self.moderated(texts[chunk.index]) if chunk.finish_reason else {}  # the whole reply
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
                                "finish_reason": c.finish_reason, **self.moderated(c.text)})
            return {**head, "choices": choices, "usage": job.usage()}

        return await respond(answer)

    async def embeddings(self, body: EmbeddingRequest):
        self.scheduler_of(body, generates=False)
        embedder, vocab = self.embedder, self.vocab
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
            return {"object": "list", "data": data, "model": self.name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        return await respond(answer)

    async def moderations(self, body: ModerationRequest):
        if self.moderator is None:
            raise APIError(404, "this server has no moderation model; start it with --moderation FOLDER "
                                "(`llmkit moderation train FOLDER`)", type="not_found_error", code="model_not_found")
        texts = body.texts()
        return await respond(lambda: {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or "llmkit-moderation",
                                      "results": self.moderator.moderate(texts)})

    async def tokenize(self, body: TokenizeRequest):
        body.check()
        if body.messages is not None:
            ids = await offload(self.encode_chat, chat_messages(body.messages), body.add_generation_prompt)
        else:
            ids = await offload(self.encode, body.prompt, "prompt", body.add_special_tokens)
        return await respond(lambda: {"count": len(ids), "max_model_len": self.context, "tokens": ids})

    async def detokenize(self, body: DetokenizeRequest):
        size = self.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {size})", param="tokens")
        return await respond(lambda: {"prompt": self.tokenizer.decode(body.tokens)})

    def tokenizer_info(self) -> dict:
        tokenizer = self.tokenizer

        def token(i):
            return tokenizer.id_to_token(i) if i is not None else None

        return {"tokenizer_class": "llmkit.Tokenizer", "vocab_size": tokenizer.vocab_size,
                "bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
                "pad_token": token(tokenizer.pad_id), "chat_template": tokenizer.chat_template,
                "model_max_length": self.context}

    def health(self) -> dict:
        if not all(s.thread is not None and s.thread.is_alive() for s in self.schedulers.values()):
            raise APIError(503, "the scheduler is not running", type="server_error")
        return {"status": "ok"}
