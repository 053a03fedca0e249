"""llmkit: a PyTorch toolkit for the whole life of a large language model."""

from llmkit.config import PRESETS, ModelConfig
from llmkit.embeddings import embed
from llmkit.errors import ConfigError, DataError, FormatError, LlmkitError
from llmkit.formats import named as _named  # noqa: F401  (teaches Tokenizer.from_pretrained .gguf and registry names)
from llmkit.generate import generate, generate_tensor, stream  # the functions shadow the subpackage's name
from llmkit.model import KVCache, Transformer, load
from llmkit.tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["PRESETS", "ConfigError", "DataError", "FormatError", "KVCache", "LlmkitError", "ModelConfig",
           "Tokenizer", "Transformer", "__version__", "embed", "generate",
           "generate_tensor", "load", "stream"]
