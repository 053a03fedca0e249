"""QLoRA's frozen base: linear weights stored quantized, dequantized on the fly in forward and backward.

`QuantizedLinear` keeps int8 per-output-channel weights (1 byte each + one fp32 scale per row) or
asymmetric int4 per group of `group_size` inputs, two weights per byte (0.5 byte + an fp16 scale and
zero per group). Quantization reuses `llmkit.quant.weights`' quantizers. The dequantized matrix
is rebuilt for the matmul and again in backward (only the input's gradient is needed: the weight is
frozen), so it is never kept alive between layers: that is where QLoRA's memory saving comes from.
`apply_lora(model, LoraConfig(base_bits=4))` swaps every block linear for one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import ConfigError
from llmkit.quant.weights import quantize_int4, quantize_int8


class _DequantMatmul(torch.autograd.Function):
    """x @ W^T with W rebuilt from its quantized form in forward and in backward (nothing saved but x's shape)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.weight_as(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.weight_as(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored as int8 or packed int4."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 64):
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            q, scale = quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale)
        elif bits == 4:
            if self.in_features % group_size or group_size % 2:
                raise ConfigError(f"int4 needs in_features ({self.in_features}) divisible by group_size ({group_size})")
            q, scale, zero, _ = quantize_int4(w, group_size)
            q = q.to(torch.uint8)
            self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))  # two weights per byte
            self.register_buffer("scales", scale.half())
            self.register_buffer("zeros", zero.half())
        else:
            raise ConfigError(f"bits={bits}; expected 8 or 4")
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def weight_as(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight (out, in)."""
        if self.bits == 8:
            return (self.qweight.to(dtype) * self.scales[:, None].to(dtype))
        low, high = self.qweight & 0xF, self.qweight >> 4
        q = torch.stack((low, high), -1).reshape(self.out_features, self.in_features // self.group_size,
                                                 self.group_size)
        w = (q.to(dtype) - 8.0) * self.scales[..., None].to(dtype) + self.zeros[..., None].to(dtype)
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight_as(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}"
