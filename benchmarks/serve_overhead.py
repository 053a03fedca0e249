"""The server's own cost per token: a tiny model (its forward step is cheap, so what is measured is
scheduling, sampling, detokenization, SSE framing and the event loop) served in-process, `--streams`
concurrent streaming clients of `--tokens` greedy tokens each, `--rounds` times. Prints one JSON line:
output tokens per second over the whole load. Compare two checkouts by running it under each
(PYTHONPATH=<checkout>), in turns.

    python benchmarks/serve_overhead.py --streams 16 --tokens 64 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import torch

from llmkit import ModelConfig, Transformer
from llmkit.serve.app import background, create_app
from llmkit.serve.config import ServeConfig
from llmkit.tokenizer import Tokenizer

TEXT = ["the cat sat on the mat. ", "a dog ran in the park! ", "héllo wörld, naïve café "] * 20


async def load(url: str, streams: int, tokens: int) -> int:
    async def one(session, i):
        body = {"model": "tiny", "prompt": TEXT[i % 3], "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        count = 0
        async with session.post("/v1/completions", json=body) as r:
            async for line in r.content:
                count += line.startswith(b"data: {")
        return count

    async with aiohttp.ClientSession(url) as session:
        return sum(await asyncio.gather(*(one(session, i) for i in range(streams))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=300, max_seq_len=512)).eval()
    tok = Tokenizer.train(TEXT, vocab_size=300)
    with background(create_app(model, tok, ServeConfig(model="tiny", max_rows=64))) as url:
        asyncio.run(load(url, 2, 4))  # warm up
        start, tokens = time.perf_counter(), 0
        for _ in range(args.rounds):
            tokens += asyncio.run(load(url, args.streams, args.tokens))
        seconds = time.perf_counter() - start
    print(json.dumps({"streams": args.streams, "tokens": tokens, "seconds": round(seconds, 3),
                      "output_tok_s": round(tokens / seconds, 1)}))


if __name__ == "__main__":
    main()
