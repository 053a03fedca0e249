"""llmkit: a PyTorch toolkit for the whole life of a large language model.

The public names below are imported on first use (PEP 562), so `import llmkit` and `llmkit --help`
start without loading torch (which takes seconds on a small CPU); `llmkit.Transformer` and the rest
work as plain attributes. The first of them also loads `formats/named.py`, which teaches
`Tokenizer.from_pretrained` .gguf files and registry names, as `import llmkit` always has.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "PRESETS": "llmkit.config", "ModelConfig": "llmkit.config",
    "ConfigError": "llmkit.errors", "DataError": "llmkit.errors", "FormatError": "llmkit.errors",
    "LlmkitError": "llmkit.errors",
    "generate": "llmkit.generate", "generate_tensor": "llmkit.generate", "stream": "llmkit.generate",
    "embed": "llmkit.embeddings",
    "KVCache": "llmkit.model", "Transformer": "llmkit.model", "load": "llmkit.model",
    "Tokenizer": "llmkit.tokenizer",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
    importlib.import_module("llmkit.formats.named")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The package object. Importing the subpackage `llmkit.generate` would set the attribute
    `generate` to it; the function `llmkit.generate` keeps the name (the subpackage stays importable)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
