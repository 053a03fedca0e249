"""The importance matrix (llama.cpp's imatrix): for every linear layer, the mean squared activation of
each input channel over calibration text. A weight that multiplies a large activation moves the
output more when rounded, so the GGUF quantizers (`formats/gguf_quants.quantize(..., importance)`)
weight their rounding error by it when they choose scales.

Saved as safetensors, one float32 vector per GGUF tensor name (`blk.0.attn_q.weight` ...), with the
number of tokens and chunks in the header's metadata, so any tool can read it; llama.cpp's own
`.dat`/GGUF imatrix stores the same sums divided by the same counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llmkit.errors import FormatError
from llmkit.files import atomic_path
from llmkit.formats.gguf import gguf_names
from llmkit.quant.calibrate import calibrate

FORMAT = "llmkit-imatrix"


def compute(model, batches: Iterable[torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """GGUF tensor name -> per-input-channel mean squared activation, and the metadata to save with it."""
    batches = list(batches)
    stats = calibrate(model, batches, include_head=True)
    ours_to_gguf = {ours.removesuffix(".weight"): g for g, ours in gguf_names(model.config).items()}
    if model.config.tie_embeddings:  # llama.cpp quantizes the tied head as token_embd, which imatrix never sees
        ours_to_gguf.pop("lm_head", None)
    matrix = {ours_to_gguf[name]: stats.mean_sq(name).float().numpy() for name in stats.sum_sq if name in ours_to_gguf}
    tokens = sum(b.numel() for b in batches)
    return matrix, {"format": FORMAT, "tokens": str(tokens), "chunks": str(len(batches))}


def save(path: str | os.PathLike, matrix: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in matrix.items()}, str(tmp), metadata)


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An importance matrix file -> GGUF tensor name -> float32 vector; anything else is a FormatError."""
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise FormatError(f"{path}: metadata format {meta.get('format')!r}; expected {FORMAT!r} "
                                  "(written by `llmkit imatrix`)")
            matrix = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: not a readable safetensors importance matrix ({e})") from None
    for name, v in matrix.items():
        if v.ndim != 1 or v.dtype != np.float32 or not np.all(np.isfinite(v)) or (v < 0).any():
            raise FormatError(f"{path}: tensor {name!r} must be a vector of finite non-negative float32 values")
    return matrix
