"""Serving under concurrent clients, `vllm bench serve` style: llmkit's server with continuous
batching vs the same server decoding one request at a time (max_rows=1) vs llama.cpp's server
(llama-cpp-python[server], which serves one request at a time) on the same SmolLM2 GGUF.

(`vllm bench serve` itself cannot be installed here: vLLM needs CUDA. This script measures what it
measures, with its definitions, through the same OpenAI streaming API.)

Each system gets `--requests` completions of `--output-len` tokens (EOS banned, greedy, the same
prompts for every system), sent by `--concurrency` clients at a time (1, 4, 16 by default). Per
request, from the client: TTFT = time to the first streamed token; TPOT = (latency - TTFT) /
(output tokens - 1); ITL = every gap between consecutive streamed tokens. Output throughput =
all output tokens / wall time of the whole run. The JSON keeps mean, median and p99 of each and the
ratios: llmkit's batched throughput over its one-at-a-time throughput and over llama.cpp's.

    python benchmarks/serve.py                        # -> benchmarks/results/serve.json
    python benchmarks/serve.py --requests 8 --output-len 16 --concurrency 1 4 --no-llamacpp
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
import time
from pathlib import Path

import openai
import torch

import llmkit
from llmkit.formats.named import resolve
from llmkit.serve.app import background, create_app
from llmkit.serve.config import ServeConfig

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


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


async def one_request(client, model: str, prompt: str, output_len: int, no_eos: dict) -> dict:
    start = time.perf_counter()
    arrivals = []
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0,
                                             stream=True, logit_bias=no_eos)
    async for chunk in stream:  # a token arrives with its text; empty chunks (a bare finish_reason) do not count
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals}


async def run_load(url: str, model: str, requests: int, concurrency: int, output_len: int, no_eos: dict) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def limited(i):
        async with gate:
            return await one_request(client, model, PROMPTS[i % len(PROMPTS)], output_len, no_eos)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(i) for i in range(requests)))
    duration = time.perf_counter() - start
    await client.close()
    ttft, tpot, itl, tokens = [], [], [], 0
    for r in results:
        a = r["arrivals"]
        tokens += len(a)
        ttft.append(a[0] - r["start"])
        if len(a) > 1:
            tpot.append((a[-1] - a[0]) / (len(a) - 1))
            itl += [b - c for b, c in zip(a[1:], a[:-1], strict=True)]
    ms = lambda xs: percentiles([x * 1000 for x in xs])  # noqa: E731
    return {"concurrency": concurrency, "requests": requests, "output_tokens": tokens,
            "all_tokens_streamed": tokens == requests * output_len, "duration_s": duration,
            "output_throughput_tok_s": tokens / duration, "request_throughput_req_s": requests / duration,
            "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "itl_ms": ms(itl)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llamacpp(gguf: Path, threads: int):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--n_threads", str(threads), "--n_threads_batch", str(threads),
                             "--interrupt_requests", "False"],  # queue concurrent requests, do not cut them
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("llama.cpp's server exited; is llama-cpp-python[server] installed?") from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama.cpp's server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="registry name, .gguf file or HF folder")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's server")
    p.add_argument("--out", default="benchmarks/results/serve.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = llmkit.load(args.model)
    # every request runs to output_len: EOS banned through logit_bias, which both servers honour
    no_eos = {str(tokenizer.eos_id): -100.0}
    systems = {
        "llmkit_continuous": ServeConfig(model="smollm2", max_rows=64),
        "llmkit_one_at_a_time": ServeConfig(model="smollm2", max_rows=1),
    }
    results: dict = {}
    for name, config in systems.items():
        with background(create_app(model, tokenizer, config)) as url:
            asyncio.run(run_load(url, "smollm2", 2, 2, 4, no_eos))  # warm up
            results[name] = [asyncio.run(run_load(url, "smollm2", args.requests, c, args.output_len, no_eos))
                             for c in args.concurrency]
            print(name, [round(r["output_throughput_tok_s"], 1) for r in results[name]], flush=True)
    if not args.no_llamacpp:
        gguf = resolve(args.model)
        proc, url = start_llamacpp(gguf, args.threads)
        try:
            asyncio.run(run_load(url, "smollm2", 2, 2, 4, no_eos))
            results["llamacpp_server"] = [asyncio.run(run_load(url, "smollm2", args.requests, c, args.output_len, no_eos))
                                          for c in args.concurrency]
            print("llamacpp_server", [round(r["output_throughput_tok_s"], 1) for r in results["llamacpp_server"]])
        finally:
            proc.terminate()
            proc.wait(10)

    def ratio(a, b):
        return {str(c): x["output_throughput_tok_s"] / y["output_throughput_tok_s"]
                for c, x, y in zip(args.concurrency, results[a], results[b], strict=True)}

    ratios = {"continuous_over_one_at_a_time_output_throughput": ratio("llmkit_continuous", "llmkit_one_at_a_time")}
    if "llamacpp_server" in results:
        ratios["continuous_over_llamacpp_output_throughput"] = ratio("llmkit_continuous", "llamacpp_server")
    report = {"model": args.model, "requests": args.requests, "output_len": args.output_len,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "llmkit_dtype": str(model.dtype),
              "notes": "llmkit runs the GGUF dequantized to fp32; llama.cpp runs the Q4_1 file itself",
              "results": results, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
