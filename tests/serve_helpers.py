"""Shared pieces of the server tests: plain HTTP calls (urllib, so a test sees exactly what went over
the wire) and the Prometheus metrics as a dict."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families


def get(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
        return r.status, r.read().decode()


def post(url, body, headers=None):
    """(status, JSON body, headers); `body` is a JSON-able object or raw bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def metrics(server, headers=None) -> dict:
    _, text = get(f"{server}/metrics", headers)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@contextlib.contextmanager
def llmkit_serve(args: list[str], log: Path, timeout: float = 120):
    """`python -m llmkit serve ARGS --port P` as a real process, its output in `log` (a file: a pipe
    nobody reads would fill with the request log); yields its base URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", *args, "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if get(f"{url}/health")[0] == 200:
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, f"the server did not come up:\n{log.read_text()}"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


TEXT = ["the cat sat on the mat. ", "a dog ran in the park! ", "héllo wörld, naïve café "] * 20


def tiny_model(max_seq_len: int):
    """A tiny Llama and a BPE tokenizer trained on TEXT; the head is scaled so the distributions are
    peaked and greedy paths are not decided by rounding."""
    import torch

    from llmkit import ModelConfig, Transformer
    from llmkit.tokenizer import Tokenizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=300, max_seq_len=max_seq_len)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model, Tokenizer.train(TEXT, vocab_size=300)


def save_tiny(folder, max_seq_len: int):
    """`tiny_model` saved as an HF folder with its tokenizer (chatml template), as `llmkit serve` loads it."""
    model, tok = tiny_model(max_seq_len)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
