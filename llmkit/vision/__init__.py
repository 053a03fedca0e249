"""Vision-language: a ViT image encoder, the image processor, the projector into the language model's
width, and the two ways images reach the one `Transformer` -- as tokens of the prompt (LLaVA) or through
gated cross-attention layers between its blocks (Llama 3.2 vision). docs/vision.md tells the story."""

from llmkit.vision.config import VisionConfig, VLMConfig
from llmkit.vision.encoder import VisionEncoder
from llmkit.vision.processor import ImageProcessor
from llmkit.vision.vlm import VisionLanguageModel

__all__ = ["ImageProcessor", "VLMConfig", "VisionConfig", "VisionEncoder", "VisionLanguageModel"]
