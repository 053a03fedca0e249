"""Text generation: sampling (logits processors), the decode engine, beam search, and the API."""

from llmkit.generate.api import generate, stream
from llmkit.generate.engine import Chunk, Completion, generate_tensor
from llmkit.generate.sampling import SamplingParams

__all__ = ["Chunk", "Completion", "SamplingParams", "generate", "generate_tensor", "stream"]
