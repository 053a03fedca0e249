"""What a model costs: parameters, weight memory at each precision, FLOPs per token.

Works from a checkpoint folder or a preset name without allocating the weights (the model is
built on PyTorch's meta device), so `llmkit info gpt2-large` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.config import PRESETS, ModelConfig
from llmkit.errors import ConfigError

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


def resolve_config(path_or_preset: str) -> ModelConfig:
    """A checkpoint folder's config, or a named preset."""
    from llmkit.formats import hf

    if Path(path_or_preset).exists():
        return hf.read_config(Path(path_or_preset))
    if path_or_preset in PRESETS:
        return ModelConfig.from_preset(path_or_preset)
    raise ConfigError(f"{path_or_preset!r} is neither a checkpoint folder nor a preset; "
                      f"presets: {sorted(PRESETS)}")


def model_summary(path_or_preset: str | ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    from llmkit.model import Transformer

    config = path_or_preset if isinstance(path_or_preset, ModelConfig) else resolve_config(path_or_preset)
    with torch.device("meta"):
        model = Transformer(config)
    params = model.num_parameters()
    seq_len = seq_len or config.max_seq_len
    return {
        "config": config.to_dict(),
        "parameters": params,
        "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "weight_memory_bytes": {k: int(params * b) for k, b in BYTES_PER_PARAM.items()},
        "seq_len": seq_len,
        "flops_per_token_forward": model.flops_per_token(seq_len, training=False),
        "flops_per_token_training": model.flops_per_token(seq_len, training=True),
    }


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def render_summary(s: dict[str, Any]) -> str:
    c = s["config"]
    lines = [f"model: {c['name']}",
             "  " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "name"),
             f"parameters: {s['parameters']:,} ({human(s['parameters'])}); "
             f"non-embedding {s['non_embedding_parameters']:,}",
             "weight memory: " + ", ".join(f"{k} {human(v, 'B')}" for k, v in s["weight_memory_bytes"].items()),
             f"FLOPs per token at seq_len {s['seq_len']}: forward {human(s['flops_per_token_forward'])}, "
             f"training {human(s['flops_per_token_training'])}"]
    return "\n".join(lines)


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       size: int = 1024, seconds: float = 0.5) -> float:
    """Measured matmul FLOP/s of this device and dtype (the denominator of MFU).

    Cached per device, dtype and thread count in the llmkit cache, since it takes about a second.
    """
    import json
    import time

    from llmkit.files import atomic_write_json, cache_dir

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    key = f"{name}|{dtype}|{size}"
    cache = cache_dir() / "peak_flops.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return known[key]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    known[key] = 2 * size**3 / best
    atomic_write_json(cache, known)
    return known[key]
