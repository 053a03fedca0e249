"""`llmkit serve` as a real process under a crowd for 60 s: 64 concurrent clients streaming, reading
slowly, hanging up early, and sending oversize or malformed bodies. Every completed response equals
the model's solo greedy output, every hang-up frees its rows, nothing is a 5xx, /health answers
throughout, and the server's memory returns to within 10 % of its idle baseline afterwards.

The figures (requests, tokens, disconnects, 429s, TTFT, RSS) are printed; run with -s to see them."""

import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest
from serve_helpers import get, metrics, save_tiny

import llmkit

PROMPTS = ["the cat", "a dog ran", "héllo", "the mat. a dog", "café naïve", "in the park", "sat on", "wörld"]
NAME, CLIENTS, SECONDS, LONG = "tiny", 64, 60.0, 1900


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny model saved as an HF folder, served by `python -m llmkit serve`; yields (url, process, model, tok)."""
    folder = save_tiny(tmp_path_factory.mktemp("tiny"), max_seq_len=2048)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "serve.log"  # a file, not a pipe nobody reads: the server logs a line per request
    process = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", str(folder), "--port", str(port),
                                "--served-model-name", NAME, "--max-rows", "64", "--kv-budget", "140000",
                                "--max-tokens-limit", str(LONG), "--max-request-bytes", "200000"],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if get(f"{url}/health")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None and time.time() < deadline, log.read_text() if process.poll() else "timeout"
        time.sleep(0.2)
    model, tok = llmkit.load(folder)
    try:
        yield url, process, model, tok
    finally:
        process.terminate()
        process.wait(30)


class Tally:
    def __init__(self):
        self.counts = {k: 0 for k in ("completed", "tokens", "disconnects", "rejected_4xx", "429", "5xx", "wrong")}
        self.ttft, self.health, self.problems = [], [], []


async def stream(session, body, tally, slow=False, hang_up_after=None):
    """A streaming completion: (200, (text, finish reason, completion tokens)), ("hung up", None) when
    this client hung up on purpose, or (status, error body)."""
    start, first, text, finish, usage = time.perf_counter(), None, [], None, None
    async with session.post("/v1/completions", json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as r:
        if r.status != 200:
            return r.status, await r.read()
        chunks = 0
        async for raw in r.content:
            line = raw.decode()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                first = first or time.perf_counter()
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
                chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                r.close()  # drops the connection mid-stream
                return "hung up", None
            if slow:
                await asyncio.sleep(0.05)
    tally.ttft.append(first - start)
    return 200, ("".join(text), finish, usage["completion_tokens"])


BAD_BODIES = [b"{not json", b'{"model": "tiny", "prompt": "x", "temperature": "hot"}',
              json.dumps({"model": NAME, "prompt": "x" * 250_000}).encode(),  # over --max-request-bytes
              json.dumps({"model": NAME, "prompt": "x", "logit_bias": {"9" * 5000: 1}}).encode()]


async def client_loop(url, index, references, tally, stop_at):
    rng = random.Random(index)
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=120)) as session:
        while time.perf_counter() < stop_at:
            kind = rng.random()
            prompt, max_tokens = rng.choice(PROMPTS), rng.choice([8, 16, 32])
            body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            if kind < 0.15:  # hang up after three tokens of a long request
                status, _ = await stream(session, {**body, "max_tokens": LONG, "ignore_eos": True}, tally,
                                         hang_up_after=3)
                tally.counts["disconnects" if status == "hung up" else "wrong"] += 1
                continue
            if kind < 0.25:  # oversize or malformed
                async with session.post("/v1/completions", data=rng.choice(BAD_BODIES),
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    key = "rejected_4xx" if r.status in (400, 413) else "5xx" if r.status >= 500 else "wrong"
                tally.counts[key] += 1
                continue
            if kind < 0.35:  # not streamed
                async with session.post("/v1/completions", json=body) as r:
                    status, out = r.status, await r.json()
                got = (out["choices"][0]["text"], out["choices"][0]["finish_reason"],
                       out["usage"]["completion_tokens"]) if status == 200 else out
            else:  # streamed; one in four reads slowly
                status, got = await stream(session, body, tally, slow=kind > 0.8)
            if status == 429:
                tally.counts["429"] += 1
            elif status != 200:
                tally.counts["5xx" if status >= 500 else "wrong"] += 1
                tally.problems.append((status, got))
            elif got != references[prompt, max_tokens]:
                tally.counts["wrong"] += 1
                tally.problems.append((prompt, max_tokens, got, references[prompt, max_tokens]))
            else:
                tally.counts["completed"] += 1
                tally.counts["tokens"] += got[2]


async def health_loop(url, tally, process, stop_at, rss):
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=10)) as session:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            async with session.get("/health") as r:
                await r.read()
                tally.health.append((r.status, time.perf_counter() - start))
            rss.append(process.memory_info().rss)
            await asyncio.sleep(0.25)


async def crowd(url, references, tally, process, seconds):
    stop_at = time.perf_counter() + seconds
    rss = []
    await asyncio.gather(health_loop(url, tally, process, stop_at, rss),
                         *(client_loop(url, i, references, tally, stop_at) for i in range(CLIENTS)))
    return max(rss)


def wait_idle(url):
    deadline = time.time() + 60
    while time.time() < deadline:
        now = metrics(url)
        if now[("llmkit:num_requests_running", ())] == 0 and now[("llmkit:num_requests_waiting", ())] == 0:
            return now
        time.sleep(0.1)
    raise AssertionError("the server did not become idle")


def test_64_clients_for_60_seconds_with_faults(served):
    url, process, model, tok = served
    server = psutil.Process(process.pid)
    references = {}
    for prompt in PROMPTS:
        for max_tokens in (8, 16, 32):
            c = llmkit.generate(model, tok, prompt, max_new_tokens=max_tokens, temperature=0)
            references[prompt, max_tokens] = (c.text, c.finish_reason, len(c.token_ids))
    warm = Tally()  # a short wave first: the idle baseline is taken after the allocator and threads warm up
    asyncio.run(crowd(url, references, warm, server, 5.0))
    wait_idle(url)
    time.sleep(2)
    idle_rss = server.memory_info().rss
    before = metrics(url)

    tally = Tally()
    peak_rss = asyncio.run(crowd(url, references, tally, server, SECONDS))
    after = wait_idle(url)
    time.sleep(2)
    end_rss = server.memory_info().rss

    abort = ("llmkit:request_success_total", (("finished_reason", "abort"),))
    aborted = after.get(abort, 0) - before.get(abort, 0)
    figures = {**tally.counts, "aborted": aborted, "seconds": SECONDS, "clients": CLIENTS,
               "ttft_p50_s": round(statistics.median(tally.ttft), 3),
               "ttft_p95_s": round(statistics.quantiles(tally.ttft, n=20)[-1], 3),
               "health_probes": len(tally.health), "health_worst_s": round(max(t for _, t in tally.health), 3),
               "rss_idle_mb": round(idle_rss / 2 ** 20), "rss_peak_mb": round(peak_rss / 2 ** 20),
               "rss_after_mb": round(end_rss / 2 ** 20)}
    print("\nload:", json.dumps(figures))
    assert tally.counts["5xx"] == 0 and tally.counts["wrong"] == 0, tally.problems[:5]
    assert tally.counts["completed"] > 500 and tally.counts["disconnects"] > 50 and tally.counts["rejected_4xx"] > 50
    assert aborted == tally.counts["disconnects"]  # every hang-up freed its rows (running is 0 again)
    assert all(status == 200 for status, _ in tally.health)
    assert end_rss <= 1.10 * idle_rss, figures
    assert process.poll() is None
