"""Weight-only quantization: the quantizers (weights.py) and the packed int8/int4 linear layers that
decode fast on CPU (linear.py, `quantize(model, bits)`); QLoRA's frozen base uses the same quantizers."""

from llmkit.quant.linear import PackedLinear, quantize

__all__ = ["PackedLinear", "quantize"]
