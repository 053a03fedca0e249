"""Continuous batching: requests join the running batch at the next step and leave when they end.

One thread owns the model. Each `step` it
  1. drops cancelled requests (a client that went away) and frees their rows,
  2. admits waiting requests, first come first served, while the KV-cache budget allows; an admitted
     request starts from the longest prefix of its prompt found in the prefix cache (prefix_cache.py),
  3. decodes one token for every running row in one batched forward pass, samples and emits it,
  4. prefills at most `prefill_chunk` prompt tokens of admitted requests, oldest first, each into its
     own cache (chunked prefill: a long prompt no longer stalls every running stream for its whole
     prefill), and while streams are running no more than fits in `step_seconds` at the rate the
     prompt's last chunk ran (a chunk far into a long prompt attends to many more keys, so it costs
     more per token: a fixed token budget let one step reach 1.8 s at 7,000 tokens); a request whose
     prompt is done samples and emits its first token at once (a burst's first tokens go out group
     by group, not all after the last prompt) and joins the batch, its `n` samples sharing the
     prefill as in `llmkit.generate`.

Sampling is `engine.sample_next`, the step `llmkit.generate` uses, so each request keeps its own
sampling parameters, seeded generators and raw logprobs, and a seeded request samples the same
tokens whatever else shares the batch. A request whose sampling fails ends alone with the error; the
other rows advance exactly as if it had not been there.

The KV cache is one tensor of right-aligned rows (`KVCache.stack`): it holds rows x (longest row +
`room`) slots. The budget bounds exactly that, counting each row at the longest it may become
(prompt + its max new tokens), so an admitted request never runs out of cache. Requests that do not
fit wait in a queue; when the queue is full `submit` raises `Overloaded` (HTTP 429 + Retry-After).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llmkit.errors import ConfigError
from llmkit.generate.engine import (
    Chunk,
    Completion,
    DecodeStep,
    PromptFill,
    Sequence,
    check_prompts,
    eos_token_ids,
    make_sequences,
    prefill,
    sample_next,
)
from llmkit.generate.sampling import SamplingParams
from llmkit.model import KVCache, Transformer
from llmkit.serve.metrics import Metrics
from llmkit.serve.prefix_cache import PrefixCache

MIN_CHUNK = 16  # prompt tokens a chunk runs at least, however slow the last one was
# Most whole prompts prefilled in one forward. A larger group pads every prompt to its longest and holds
# every first token until the whole group is done: 16 short prompts (8-16 tokens, SmolLM2 int4, 2 threads)
# took 86-90 ms as one forward, 82 ms as two of 8 sorted by length (mean first token at 60 ms), 110 ms as
# four of 4.
PREFILL_GROUP = 8
log = logging.getLogger("llmkit.serve")  # one line per finished request (`llmkit serve` prints them)


def release_openmp_workers() -> None:
    """Free the calling thread's pool of OpenMP worker threads (OpenMP 5's `omp_pause_resource_all`).

    OpenMP keeps a pool of workers for each thread that has run a parallel region; once libgomp
    manages more threads than there are CPUs it stops spinning between parallel regions and sleeps
    on a futex instead, and a decode step runs hundreds of short regions. The pool the main thread
    kept from loading and compiling the model made the scheduler thread's steps 2.2x slower on
    2 cores (SmolLM2 int4 compiled, one row: 84 against 190 tokens/s once freed). A later parallel
    region on this thread makes a new pool. Without an OpenMP runtime this does nothing."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        return
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    pause(1)  # omp_pause_soft: threads go, settings stay


class Overloaded(Exception):
    """The waiting queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Request:
    """One submitted prompt and its `n` rows. `emit` is called on the scheduler thread with each
    `Chunk`, then with None when every row has ended (or with an exception if the request failed)."""

    prompt: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    emit: Callable[[Chunk | Exception | None], None]
    reserved: int  # cache slots each row may need: prompt + max new tokens
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    last_token_at: float | None = None
    first_token_at: float | None = None
    fill: PromptFill | None = None  # its prefill, while the prompt is being run in chunks
    prefill_rate: float | None = None  # seconds per prompt token of its last chunk

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)

    @property
    def completions(self) -> list[Completion]:
        return [s.out for s in self.seqs]


class Scheduler:
    """Runs requests with continuous batching on a background thread (`start`), or by hand (`step`)."""

    def __init__(self, model: Transformer, tokenizer, kv_budget: int = 32768, max_rows: int = 64,
                 max_waiting: int = 256, room: int = 16, metrics: Metrics | None = None, prefill_chunk: int = 512,
                 prefix_cache: int = 0, compile: bool = False, step_seconds: float = 0.5):
        if prefill_chunk < 1 or step_seconds < 0:
            raise ConfigError(f"prefill_chunk={prefill_chunk}, step_seconds={step_seconds}: expected at least 1 token "
                              "per step and seconds >= 0 (0: no time cap)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.kv_budget, self.max_rows, self.max_waiting, self.room = kv_budget, max_rows, max_waiting, room
        self.prefill_chunk, self.step_seconds = prefill_chunk, step_seconds
        self.prefix = PrefixCache(model, prefix_cache) if prefix_cache else None
        self.metrics = metrics or Metrics()
        self.metrics.gauges.update({"num_requests_running": lambda: len(self.running) + len(self.filling),
                                    "num_requests_waiting": lambda: len(self.waiting),
                                    "kv_cache_usage_perc": self.kv_usage})
        compile = compile and model.config.causal  # an encoder only embeds
        self.decode = DecodeStep(model, compile)  # compiled: batches of 1-16 rows through torch.compile
        if compile:
            self.decode.warm_up(max_rows)
        self.waiting: deque[Request] = deque()
        self.filling: list[Request] = []  # admitted, prompt being prefilled
        self.running: list[Request] = []
        self.rows: list[Sequence] = []  # one per cache row, in cache order
        self.owners: list[Request] = []  # the request of each row
        self.tokens: torch.Tensor | None = None  # each row's last token, the input of the next decode
        self.cache: KVCache | None = None
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # ---- the client side (any thread) ------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable) -> Request:
        """Queue a request; raises ConfigError if it can never run here, Overloaded if the queue is full."""
        if params.num_beams > 1:
            raise ConfigError("beam search is not served (num_beams > 1); use llmkit.generate")
        check_prompts(self.model, [prompt])
        seqs = make_sequences(self.model, prompt, params, self.tokenizer, 0,
                              set(eos_token_ids(self.model, self.tokenizer, params)))
        request = Request(list(prompt), params, seqs, emit, len(prompt) + seqs[0].limit)
        need = params.n * (request.reserved + self.room)
        if need > self.kv_budget or params.n > self.max_rows:
            raise ConfigError(f"the request needs {need} tokens of KV cache (n={params.n} x ({len(prompt)} prompt "
                              f"+ {seqs[0].limit} new + {self.room} spare)), more than the server's budget of "
                              f"{self.kv_budget} tokens and {self.max_rows} rows; lower max_tokens or n")
        with self.cond:
            if self.stopping:
                raise Overloaded("the server is shutting down", retry_after=5)
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} requests are already waiting (the limit is "
                                 f"{self.max_waiting}); retry shortly")
            self.waiting.append(request)
            self.cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request at the next step (its rows leave the batch; nothing more is emitted)."""
        with self.cond:
            request.cancelled = True
            self.cond.notify()

    def kv_usage(self) -> float:
        cache = self.cache
        return 0.0 if cache is None or not self.rows else cache.batch_size * cache.max_len / self.kv_budget

    # ---- the loop (one thread) -------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Run the loop on its own thread. The calling thread (the one that loaded the model, as a
        rule) gives up its OpenMP workers first: see `release_openmp_workers`."""
        release_openmp_workers()
        self.thread = threading.Thread(target=self._loop, name="llmkit-scheduler", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.stopping and not self.waiting and not self.rows and not self.filling:
                        self.cond.wait()
                    if self.stopping:
                        return
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                    self._fail_all(e)

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step: drop cancelled, admit, decode, prefill a chunk, sample, emit, release finished."""
        started = time.perf_counter()
        with self.cond:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._finish(request, "abort", emit=False)
            admitted = self._admit()
        self._start(admitted)  # a prefix-cache lookup copies tensors: not under the lock submitters wait on
        for request in [r for r in self.filling if r.cancelled]:
            self.filling.remove(request)
            self._finish(request, "abort", emit=False)
        if any(r.cancelled for r in self.running):
            for s, owner in zip(self.rows, self.owners, strict=True):
                if owner.cancelled and not s.done:
                    s.end("abort")
            self._release()

        caches, tokens, rows, owners = [], [], [], []
        if self.rows:
            if self.cache.length == self.cache.max_len:
                self.cache = KVCache.stack([self.cache], self.room)
            tokens.append(self._sample(self.decode(self.tokens, self.cache), self.rows, self.owners))
            caches.append(self.cache)
            rows += self.rows
            owners += self.owners
        for requests, cache, first in self._prefill(started):  # first tokens go out as their prompts finish
            seqs = [s for r in requests for s in r.seqs]
            new_owners = [r for r in requests for _ in r.seqs]
            for s in seqs:
                if s.limit == 0:  # max_tokens=0: the prompt's logprobs only
                    s.end("length")
            tokens.append(self._sample(first, seqs, new_owners))
            caches.append(cache)
            rows += seqs
            owners += new_owners
            self.running += requests
            self.metrics.add("prompt_tokens_total", sum(len(r.prompt) for r in requests))
        if not rows:
            return
        if len(caches) > 1 or self.cache is not caches[0]:
            self.cache = KVCache.stack(caches, self.room)
        self.rows, self.owners, self.tokens = rows, owners, torch.cat(tokens)
        self._release()

    # ---- helpers ---------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[Sequence], owners: list[Request]) -> torch.Tensor:
        """Sample the next token of `rows` and emit it now; returns the tokens (the next decode's input).
        A request whose sampling fails gets its error alone; nothing of it is emitted."""
        live = [r for r, s in enumerate(rows) if not s.done]
        errors: dict[int, Exception] = {}
        tokens, chunks = sample_next(logits, rows, errors)
        failed = {id(owners[r]): (owners[r], e) for r, e in errors.items()}
        for request, error in failed.values():
            request.emit(error)
        self._emit([owners[r] for r in live if r not in errors], chunks)
        return tokens

    def _admit(self) -> list[Request]:
        """Waiting requests that fit beside the running and filling ones (called with the lock held)."""
        admitted: list[Request] = []
        rows = len(self.rows) + sum(r.params.n for r in self.filling)
        longest = max((r.reserved for r in self.running + self.filling), default=0)
        while self.waiting:
            request = self.waiting[0]
            n, length = rows + request.params.n, max(longest, request.reserved)
            if n > self.max_rows or n * (length + self.room) > self.kv_budget:
                break  # first come, first served: later requests wait behind it
            self.waiting.popleft()
            admitted.append(request)
            rows, longest = n, length
        return admitted

    def _start(self, admitted: list[Request]) -> None:
        """Begin each admitted request's prefill, from a cached prefix of its prompt when there is one
        (not with echo, which needs every prompt position's logits)."""
        for request in admitted:
            cache = None
            if self.prefix is not None and not request.params.echo:
                cache = self.prefix.lookup(request.prompt)
                self.metrics.add("prefix_cache_queries_total", len(request.prompt))
                self.metrics.add("prefix_cache_hits_total", cache.length if cache is not None else 0)
            request.fill = PromptFill(self.model, request.prompt, request.seqs, cache)
            self.filling.append(request)

    def _prefill(self, started: float) -> Iterator[tuple[list[Request], KVCache, torch.Tensor]]:
        """Spend this step's `prefill_chunk` prompt tokens on the filling requests, oldest first;
        yields (requests, their cache, first logits: a row per sample) as prompts finish. Whole
        prompts that start from nothing and fit the budget run together in left-padded forwards of
        up to PREFILL_GROUP prompts of alike lengths, as llama.cpp batches a burst's prompts (one pass
        instead of one each), their first tokens out as each group ends; the rest advance
        alone, a chunk at a time, each chunk cut to what the step's time left allows."""
        budget, together = self.prefill_chunk, []
        for request in list(self.filling):
            if budget <= 0:
                break
            left = len(request.prompt) - request.fill.done
            if request.fill.done == 0 and request.params.n == 1 and not request.params.echo and left <= budget:
                together.append(request)
                budget -= left
                continue
            new = min(budget, left, self._affordable(request, started))
            budget -= new
            finished = self._advance(request, new)
            if finished is not None:
                yield finished
        together.sort(key=lambda r: len(r.prompt))  # alike lengths pad least
        for i in range(0, len(together), PREFILL_GROUP):
            group = together[i:i + PREFILL_GROUP]
            if len(group) > 1 and (finished := self._prefill_together(group)) is not None:
                yield finished
                continue
            for request in group:  # one alone, or each of a group whose forward failed (only a bad one fails)
                if (finished := self._advance(request, len(request.prompt))) is not None:
                    yield finished

    def _affordable(self, request: Request, started: float) -> int:
        """Prompt tokens of `request` that fit in what is left of `step_seconds` since the step
        `started`, at the rate its last chunk ran (the next chunk attends to a few more keys, so this
        runs a little over: hence a target under the 1 s a stream should wait at most). Unbounded
        when no stream is waiting for a token or before its first chunk; at least MIN_CHUNK tokens,
        so a prompt always moves on."""
        if not self.rows or not self.step_seconds or request.prefill_rate is None:
            return self.prefill_chunk
        left = self.step_seconds - (time.perf_counter() - started)
        return max(MIN_CHUNK, int(left / request.prefill_rate))

    def _advance(self, request: Request, tokens: int) -> tuple[list[Request], KVCache, torch.Tensor] | None:
        """Prefill up to `tokens` more of one request's prompt; its (requests, cache, logits) once done.
        A failure fails this request only."""
        fill, started, before = request.fill, time.perf_counter(), request.fill.done
        try:
            last = fill.advance(tokens)
        except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
            self.filling.remove(request)
            request.fill = None
            request.emit(e)
            self._finish(request, "error", emit=False)
            return None
        request.prefill_rate = (time.perf_counter() - started) / max(fill.done - before, 1)
        if last is None:
            return None
        self.filling.remove(request)
        if self.prefix is not None:
            self.prefix.insert(request.prompt, fill.cache)
        cache, first = fill.rows(last)
        request.fill = None
        return [request], cache, first

    def _prefill_together(self, requests: list[Request]) -> tuple[list[Request], KVCache, torch.Tensor] | None:
        """Whole prompts in one left-padded forward (`engine.prefill`, as `llmkit.generate` runs
        several); None if that fails. On a quantized model the batch's rows may take the int8 GEMM
        where a short prompt alone takes the packed kernel (`PackedLinear` picks by rows), so its
        logits can differ from a lone run's by that rounding, as a batch's do in llama.cpp and vLLM;
        unquantized, only the GEMM's summation order differs."""
        try:
            cache, first = prefill(self.model, [r.prompt for r in requests], [r.seqs[0] for r in requests], 0)
        except Exception:  # noqa: BLE001 - the caller prefills each alone to find the one at fault
            return None
        width = max(len(r.prompt) for r in requests)
        for row, request in enumerate(requests):
            self.filling.remove(request)
            request.fill = None
            if self.prefix is not None:
                self.prefix.insert(request.prompt, cache, row=row, offset=width - len(request.prompt))
        return requests, cache, first

    def _emit(self, owners: list[Request], chunks: list[Chunk]) -> None:
        now = time.perf_counter()
        stepped = {}
        for owner, chunk in zip(owners, chunks, strict=True):
            owner.emit(chunk)
            stepped[id(owner)] = owner
        self.metrics.add("generation_tokens_total", len(chunks))
        for request in stepped.values():
            if request.last_token_at is None:
                request.first_token_at = now
                self.metrics.observe("time_to_first_token_seconds", now - request.arrived)
            else:
                self.metrics.observe("inter_token_latency_seconds", now - request.last_token_at)
            request.last_token_at = now

    def _release(self) -> None:
        """Drop the rows that ended from the batch and the cache; finish requests whose rows all ended."""
        keep = [i for i, s in enumerate(self.rows) if not s.done]
        if len(keep) < len(self.rows):
            if keep:
                index = torch.tensor(keep, device=self.cache.valid.device)
                self.cache.reorder(index)
                self.cache = KVCache.stack([self.cache], self.room)
                self.tokens = self.tokens.index_select(0, index)
            else:
                self.cache = self.tokens = None
            self.rows = [self.rows[i] for i in keep]
            self.owners = [self.owners[i] for i in keep]
        for request in [r for r in self.running if r.done]:
            self.running.remove(request)
            reasons = {s.out.finish_reason for s in request.seqs}
            self._finish(request, "abort" if request.cancelled else sorted(reasons)[0],
                         emit=not request.cancelled)

    def _finish(self, request: Request, reason: str, emit: bool = True) -> None:
        self.metrics.finish(reason)
        if request.last_token_at is not None:
            self.metrics.observe("e2e_request_latency_seconds", request.last_token_at - request.arrived)
        if log.isEnabledFor(logging.INFO):
            generated = sum(len(c.token_ids) for c in request.completions)
            ttft = "-" if request.first_token_at is None else f"{1000 * (request.first_token_at - request.arrived):.0f}"
            log.info("request %x: %s, prompt %d tokens, generated %d in %d row(s), first token %s ms, total %.0f ms",
                     id(request) & 0xFFFFFF, reason, len(request.prompt), generated, len(request.seqs), ttft,
                     1000 * (time.perf_counter() - request.arrived))
        if emit:
            request.emit(None)

    def _fail_all(self, error: Exception) -> None:
        """A failed batch step: every running and filling request gets the error; the scheduler starts empty."""
        for request in self.running + self.filling:
            request.emit(error)
            self._finish(request, "error", emit=False)
        self.running, self.filling, self.rows, self.owners, self.cache, self.tokens = [], [], [], [], None, None
