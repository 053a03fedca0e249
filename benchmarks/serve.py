"""Serving under concurrent clients, `vllm bench serve` style: `llmkit serve` against llama.cpp's own
server (xllamacpp: llama-server with continuous batching, `n_parallel` = the concurrency) on the
same GGUF, both as separate processes with the same threads, taking turns.

(`vllm bench serve` itself cannot be installed here: vLLM needs CUDA. This script measures what it
measures, with its definitions, through the same OpenAI streaming API.)

Workloads, each run `--rounds` times per system in turns (medians kept):
  * throughput: `--requests` completions of `--output-len` tokens (EOS banned through logit_bias,
    greedy, the same prompts for both), `--concurrency` clients at a time (1, 4, 16, 64). Per request,
    from the client: TTFT = time to the first streamed token; TPOT = (latency - TTFT) / (tokens - 1);
    ITL = every gap between streamed tokens. Output throughput = output tokens / wall time.
  * multi-turn chat: 8 conversations x 4 turns sharing a system prompt, each turn sent with the whole
    history; TTFT of llmkit with its prefix cache and without (`--prefix-cache 0`), and llama.cpp's.
  * chunked prefill: one stream decoding while an ~`--long-prompt`-token prompt arrives; the stream's
    longest gap between tokens with the server's defaults (512-token chunks, each cut to what fits in
    `--step-seconds` 0.5 while a stream runs) and with chunking off; and TTFT p50 of a burst of 64
    requests, chunked and not.
  * memory: peak RSS of each server process idle and under 16 streams.

    python benchmarks/serve.py                        # -> benchmarks/results/serve.json
    python benchmarks/serve.py --requests 4 --output-len 8 --concurrency 1 --rounds 1 --skip multiturn chunked
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
import psutil

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving.",
    "List some tips for keeping houseplants healthy in winter.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between a violin and a cello?",
    "Give me a recipe for a simple vegetable soup.",
    "Why do leaves change colour in autumn?",
    "Summarise the plot of a detective novel you would like to read.",
]
SYSTEM = ("You are a patient, precise assistant for a public library. You answer questions about books, "
          "authors, opening hours and borrowing rules. Keep answers short, friendly and factual. " * 4)
XLLAMACPP_SERVER = """
import sys, time
import xllamacpp
gguf, port, parallel, threads, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
p = xllamacpp.CommonParams()
p.model.path, p.n_parallel, p.n_ctx, p.port, p.cont_batching = gguf, parallel, ctx * parallel, port, True
p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
server = xllamacpp.Server(p)
print("listening", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""


def stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in its own process: started, waited for, measured (RSS), stopped."""

    def __init__(self, argv: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = Path(tempfile.mkstemp(prefix="serve-bench-", suffix=".log")[1])  # kept: why a server died
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while True:  # both answer /health with 200 once the model is loaded (llama.cpp: 503 before)
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{argv[:4]} did not start; its output: {self.log}")
            time.sleep(0.5)
        asyncio.run(throughput(self.url, 2, 2, 4, {}))  # warm up (and wait for the model to load)

    def rss_mb(self) -> float:
        p = psutil.Process(self.proc.pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2 ** 20

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def llmkit_server(model: str, threads: int, extra: list[str]) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-m", "llmkit", "serve", model, "--port", str(port), "-t", str(threads),
                          "--served-model-name", "m", "--max-rows", "64", "--kv-budget", "262144", *extra], port)


def llamacpp_server(gguf: str, threads: int, parallel: int) -> ServerProcess:
    port = free_port()
    return ServerProcess([sys.executable, "-c", XLLAMACPP_SERVER, gguf, str(port), str(parallel), str(threads),
                          "8192"], port)


async def stream(client, prompt=None, messages=None, max_tokens=64, logit_bias=None) -> dict:
    """One streamed request: its start and the arrival time of each token with text."""
    start, arrivals = time.perf_counter(), []
    if messages is None:
        response = await client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                   stream=True, logit_bias=logit_bias or None)
        async for chunk in response:
            if chunk.choices and chunk.choices[0].text:
                arrivals.append(time.perf_counter())
    else:
        response = await client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                        temperature=0, stream=True, logit_bias=logit_bias or None)
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals}


def client_of(url: str):
    """A fresh connection per request: llama-server closes idle keep-alive connections, and a request sent on
    one it has just closed fails ("Server disconnected without sending a response"), which is the client's
    race, not a server error. Connecting to localhost costs well under a millisecond, alike for both."""
    import httpx2  # the openai client's own transport

    http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_keepalive_connections=0), timeout=1200)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1200, http_client=http)


async def throughput(url: str, requests: int, concurrency: int, output_len: int, no_eos: dict) -> dict:
    client, gate = client_of(url), asyncio.Semaphore(concurrency)

    async def limited(i):
        async with gate:
            return await stream(client, PROMPTS[i % len(PROMPTS)], max_tokens=output_len, logit_bias=no_eos)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(requests)))
    duration = time.perf_counter() - start
    await client.close()
    ttft, tpot, itl, tokens = [], [], [], 0
    for r in results:
        a = r["arrivals"]
        tokens += len(a)
        if a:
            ttft.append(a[0] - r["start"])
        if len(a) > 1:
            tpot.append((a[-1] - a[0]) / (len(a) - 1))
            itl += [b - c for b, c in zip(a[1:], a[:-1], strict=True)]
    ms = lambda xs: stats([x * 1000 for x in xs])  # noqa: E731
    return {"concurrency": concurrency, "requests": requests, "output_tokens": tokens, "duration_s": duration,
            "all_tokens_streamed": tokens == requests * output_len, "output_throughput_tok_s": tokens / duration,
            "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "itl_ms": ms(itl)}


async def multiturn(url: str, no_eos: dict, conversations: int = 8, turns: int = 4, output_len: int = 32) -> dict:
    """Every conversation in parallel, turn by turn; TTFT of each turn after the first (the cacheable ones)."""
    client = client_of(url)
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(conversations)]
    ttft = {t: [] for t in range(turns)}
    for t in range(turns):
        for h, i in zip(histories, range(conversations), strict=True):
            h.append({"role": "user", "content": PROMPTS[(i + t) % len(PROMPTS)]})
        results = await asyncio.gather(*(stream(client, messages=h, max_tokens=output_len, logit_bias=no_eos)
                                         for h in histories))
        for h, r in zip(histories, results, strict=True):
            ttft[t].append(r["arrivals"][0] - r["start"])
            h.append({"role": "assistant", "content": "I see. " * (len(r["arrivals"]) // 2)})
    await client.close()
    return {"ttft_ms_median_by_turn": [statistics.median(v) * 1000 for v in ttft.values()],
            "ttft_ms_median_later_turns": statistics.median([x for t in range(1, turns) for x in ttft[t]]) * 1000}


async def long_prompt_gap(url: str, long_tokens: int, no_eos: dict) -> dict:
    """A stream decoding while a long prompt arrives: the stream's longest gap between tokens."""
    client = client_of(url)
    running = asyncio.ensure_future(stream(client, PROMPTS[0], max_tokens=400, logit_bias=no_eos))
    await asyncio.sleep(2.0)
    text = " ".join(PROMPTS) + " "
    long_prompt = (text * (long_tokens // 90 + 1))[: long_tokens * 4]
    start = time.perf_counter()
    long = asyncio.ensure_future(stream(client, long_prompt, max_tokens=4, logit_bias=no_eos))
    r, done = await asyncio.gather(running, long)
    await client.close()
    a = [t for t in r["arrivals"] if t >= start]
    gaps = [b - c for b, c in zip(a[1:], a[:-1], strict=True)]
    return {"longest_gap_s": max(gaps) if gaps else None, "long_prompt_ttft_s": done["arrivals"][0] - done["start"]}


async def burst_ttft(url: str, no_eos: dict, requests: int = 64) -> dict:
    client = client_of(url)
    results = await asyncio.gather(*(stream(client, PROMPTS[i % len(PROMPTS)], max_tokens=16, logit_bias=no_eos)
                                     for i in range(requests)))
    await client.close()
    return {"ttft_p50_s": statistics.median(r["arrivals"][0] - r["start"] for r in results)}


def median_run(runs: list[dict]) -> dict:
    """The run with the median output throughput (a whole run, so its fields stay consistent)."""
    return sorted(runs, key=lambda r: r["output_throughput_tok_s"])[len(runs) // 2]


def machine() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf file")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="turns per system and concurrency (the median is kept)")
    p.add_argument("--llmkit-args", default="", help="extra `llmkit serve` flags, e.g. '--quantize int4'")
    p.add_argument("--long-prompt", type=int, default=7000, help="tokens of the chunked-prefill probe's prompt")
    p.add_argument("--skip", nargs="*", default=[], choices=["multiturn", "chunked", "memory"])
    p.add_argument("--out", default="benchmarks/results/serve.json")
    args = p.parse_args()

    from llmkit.formats.named import read_tokenizer, resolve

    gguf = str(resolve(args.model))
    no_eos = {str(read_tokenizer(args.model).eos_id): -100}  # every request runs to output_len, in both servers
    extra = args.llmkit_args.split()
    results: dict = {"throughput": {"llmkit": [], "llamacpp": []}}
    ours = llmkit_server(args.model, args.threads, extra)
    try:
        for c in args.concurrency:
            theirs = llamacpp_server(gguf, args.threads, c)
            runs = {"llmkit": [], "llamacpp": []}
            try:
                for _ in range(args.rounds):  # in turns
                    for name, server in (("llmkit", ours), ("llamacpp", theirs)):
                        runs[name].append(asyncio.run(throughput(server.url, max(args.requests, c), c,
                                                                 args.output_len, no_eos)))
                if c == 16 and "memory" not in args.skip:
                    results["rss_mb_after_16_streams"] = {"llmkit": ours.rss_mb(), "llamacpp": theirs.rss_mb()}
            finally:
                theirs.stop()
            for name in runs:
                results["throughput"][name].append(median_run(runs[name]))
            print(c, {n: round(results["throughput"][n][-1]["output_throughput_tok_s"], 1) for n in runs}, flush=True)
        if "memory" not in args.skip:
            results["rss_mb_idle_llmkit"] = ours.rss_mb()
    finally:
        ours.stop()
    if "memory" not in args.skip:
        theirs = llamacpp_server(gguf, args.threads, 16)
        results["rss_mb_idle_llamacpp_16_slots"] = theirs.rss_mb()
        theirs.stop()

    if "multiturn" not in args.skip:
        results["multiturn"] = {}
        for name, start in (("llmkit_prefix_cache", lambda: llmkit_server(args.model, args.threads, extra)),
                            ("llmkit_no_prefix_cache", lambda: llmkit_server(args.model, args.threads,
                                                                             [*extra, "--prefix-cache", "0"])),
                            ("llamacpp", lambda: llamacpp_server(gguf, args.threads, 8))):
            server = start()
            try:
                results["multiturn"][name] = asyncio.run(multiturn(server.url, no_eos))
            finally:
                server.stop()
            print(name, results["multiturn"][name], flush=True)

    if "chunked" not in args.skip:
        results["chunked_prefill"] = {}
        for name, flags in (("chunked", []),  # the defaults: 512-token chunks, cut to --step-seconds 0.5
                            ("unchunked", ["--prefill-chunk", "1000000", "--step-seconds", "0"])):
            server = llmkit_server(args.model, args.threads, [*extra, *flags])
            try:
                results["chunked_prefill"][name] = {**asyncio.run(long_prompt_gap(server.url, args.long_prompt, no_eos)),
                                                    "burst_64": asyncio.run(burst_ttft(server.url, no_eos))}
            finally:
                server.stop()
            print(name, results["chunked_prefill"][name], flush=True)

    ratios = {str(c): a["output_throughput_tok_s"] / b["output_throughput_tok_s"]
              for c, a, b in zip(args.concurrency, results["throughput"]["llmkit"], results["throughput"]["llamacpp"],
                                 strict=True)}
    ttft = {str(c): a["ttft_ms"]["median"] / b["ttft_ms"]["median"]
            for c, a, b in zip(args.concurrency, results["throughput"]["llmkit"], results["throughput"]["llamacpp"],
                               strict=True)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torch
    import xllamacpp

    report = {"command": " ".join(["python", *sys.argv]), "commit": commit, "machine": machine(),
              "torch": torch.__version__, "xllamacpp": getattr(xllamacpp, "__version__", "?"),
              "model": args.model, "gguf": Path(gguf).name, "threads": args.threads, "llmkit_args": args.llmkit_args,
              "output_throughput_llmkit_over_llamacpp": ratios, "ttft_median_llmkit_over_llamacpp": ttft,
              **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"throughput_ratio": ratios, "ttft_ratio": ttft}, indent=2))


if __name__ == "__main__":
    main()
