"""Weight-only int8 / int4 linear layers for fast CPU decoding (gpt-fast's module swap), with int8
GEMMs for prefill.

Decoding one token reads every weight once and does little arithmetic with it, so its speed is set
by how many bytes the weights take. `quantize(model, bits)` swaps each linear layer of the blocks and
the LM head for a `PackedLinear` that keeps:

- the weight quantized per output channel (int8) or per group of `group_size` inputs (int4, with a
  zero point), packed for PyTorch's CPU kernels `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`,
  which run with bf16 activations; they serve small batches (decoding);
- the weight as int8 per output channel (the same int8 weight, or the int4 weight re-quantized),
  for large batches (prefill), which are compute-bound: the activations are quantized to int8 per
  row and multiplied by `torch._int_mm` (VNNI), 2.4x an fp32 GEMM on a 2-core Xeon where a bf16 GEMM
  is 0.6x (benchmarks/generate.py). Prefill thus computes with 8-bit activations, as llama.cpp's
  quantized matmuls do; the KV cache it fills differs from decoding's by that rounding.

Everything else (embeddings, norms, attention, the KV cache, logits) stays in the model's dtype.
The accuracy cost is measured in benchmarks/generate.py (logit error, top-1 agreement, KL).

"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmkit.errors import ConfigError
from llmkit.moe import MoE
from llmkit.quant.calibrate import Calibration
from llmkit.quant.gptq import gptq_int4
from llmkit.quant.weights import dequantize_int4, int8_rows, quantize_int4, quantize_int8

_SHARED_INPUT = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}  # a fused layer's input is its first part's
_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
SMALL_BATCH = 16  # rows at or below this use the packed kernel; above, the int8 GEMM


class PackedLinear(nn.Module):
    """y = x @ W_q^T (+ bias) with W_q an int8 or int4 quantization of a linear layer's weight."""

    def __init__(self, linear: nn.Linear, bits: int = 8, group_size: int = 32, int8_prefill: bool = True,
                 int4: tuple | None = None, importance: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        self.out_features, self.in_features = w.shape
        self.bits = bits
        self.group_size = group_size
        if bits == 8:
            q, scale = quantize_int8(w)
            self.register_buffer("packed", q)
            self.register_buffer("scales", scale.to(torch.bfloat16))
            dequant = q.float() * scale[:, None]
        elif bits == 4:
            if self.in_features % group_size or self.out_features % 8:
                raise ConfigError(f"int4 needs in_features ({self.in_features}) divisible by group_size "
                                  f"({group_size}) and out_features ({self.out_features}) divisible by 8")
            # `int4`: a (q, scale, zero, dequant) already chosen on quantize_int4's grid (GPTQ)
            q, scale, zero, dequant = int4 if int4 is not None else quantize_int4(w, group_size, importance)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales", torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
                                 .to(torch.bfloat16))
        else:
            raise ConfigError(f"bits={bits}; expected 8 or 4")
        self.int8_prefill = int8_prefill
        if int8_prefill:  # int8 per output channel: the int8 weight itself, or the int4 one re-quantized
            w8, w8_scale = (q, scale) if bits == 8 else quantize_int8(dequant)
            self.register_buffer("w8", w8)  # (out, in), for the prefill GEMM
            self.register_buffer("w8_scale", w8_scale.float())
        else:  # the exact quantized weight for a GEMM in the model's dtype: slower, no activation rounding
            self.register_buffer("weight_dequantized", dequant.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= SMALL_BATCH:
            x2 = x2.to(torch.bfloat16)
            if self.bits == 8:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.packed, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales)
        elif self.int8_prefill:
            xq, x_scale = int8_rows(x2.float())
            y = torch._int_mm(xq, self.w8.t()) * x_scale * self.w8_scale
        else:
            y = x2 @ self.weight_dequantized.to(x2.dtype).T
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}"


@torch.no_grad()
def quantize(model: nn.Module, bits: int = 8, group_size: int = 32, head_bits: int = 8,
             int8_prefill: bool = True, calibration: Calibration | None = None,
             importance: Calibration | None = None,
             groups: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Swap, in place, every linear layer of `model.blocks` for a `PackedLinear` of `bits`, and the LM
    head for one of `head_bits`.

    Layers that read the same input are fused first (`Transformer.fuse_projections`: q, k, v into
    `qkv_proj`; gate and up into `gate_up_proj`): one packed call instead of three or two, which
    matters at batch 1, where each call costs about as much in overhead as in reading weights. Quantizing the groups of a fused
    layer is the same as quantizing its parts, since groups run along the inputs.

    `int8_prefill=False` runs prefill on the exact quantized weights in the model's dtype (no
    activation rounding; as slow as the unquantized model, and the memory of both). On SmolLM2-135M
    int8 activations raise the teacher-forced KL to the fp32 model from 0.002 to 0.045 nats
    (benchmarks/results/generate.json); decoding itself never rounds activations.

    The LM head stays 8-bit by default, as llama.cpp's quantization mixes keep the output tensor at
    higher precision: on SmolLM2-135M an int4 head raises the KL to the fp32 model ~30-fold (see
    benchmarks/results/generate.json). A tied head is quantized as its own copy; the embedding it was
    tied to stays in full precision. The model then runs inference only.

    `calibration` with Gram matrices (`calibrate(model, batches, gram=True)`, taken before this call)
    chooses the int4 weights of the blocks by GPTQ (quant/gptq.py) instead of rounding to nearest;
    a fused layer uses the Gram matrix of the input its parts share.

    `importance` (`calibrate(model, batches)`, taken before this call) weights each int4 group's rounding
    error by its columns' mean squared activation (llama.cpp's imatrix) when choosing the group's scale
    and zero (`weights.quantize_int4`); one of the two, not both.

    `groups` (`gguf.read_int4_groups`: a Q4_0/Q4_1/Q4_K file's own levels, scales and offsets on groups
    of 32) packs those layers as the file stores them instead of re-quantizing their float copies
    (which loses Q4_0's and Q4_K's grids: a group's min and max need not be on them); each must
    equal the layer's weight it stands for, or this refuses (the model changed since it was read).
    Layers the file stores otherwise (a Q4_K_M's Q6_K ones) are quantized as usual.
    """
    if model.device.type != "cpu":
        raise ConfigError(f"quantize() uses PyTorch's CPU packed kernels; the model is on {model.device}")
    if calibration is not None and (bits != 4 or not calibration.gram):
        raise ConfigError("GPTQ (a calibration) applies to bits=4 and needs Gram matrices "
                          "(calibrate(..., gram=True)); expected both")
    if importance is not None and (bits != 4 or calibration is not None):
        raise ConfigError("an importance matrix weights the int4 rounding (bits=4) and replaces GPTQ's "
                          "calibration; pass one of the two with bits=4")
    if groups and (bits != 4 or group_size != 32 or calibration is not None or importance is not None):
        raise ConfigError("a file's int4 groups are packed as they are: bits=4, group_size=32, and no "
                          "calibration or importance to choose other ones")
    model.fuse_projections()
    for path, parent in list(model.blocks.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(parent, MoE):  # routers stay exact, as in llama.cpp
                int4 = weights = None
                source = f"blocks.{path}.{_SHARED_INPUT.get(name, name)}"
                if calibration is not None:
                    int4 = gptq_int4(child.weight, calibration.gram[source].to(child.weight.device), group_size)
                if importance is not None:
                    weights = importance.mean_sq(source).float()
                if groups:
                    int4 = _file_int4(child, parent, f"blocks.{path}", name, groups)
                setattr(parent, name, PackedLinear(child, bits, group_size, int8_prefill, int4, weights))
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = PackedLinear(model.lm_head, head_bits, group_size, int8_prefill)
    return model.eval()


def _file_int4(linear: nn.Linear, parent: nn.Module, prefix: str, name: str, groups: dict) -> tuple | None:
    """The (q, scale, zero, dequant) of `linear` from a file's int4 groups, part by part for a fused
    layer (a part the file stores otherwise is rounded to nearest); None if the file has none of it."""
    parts = _PARTS.get(name, (name,))
    if not any(f"{prefix}.{part}" in groups for part in parts):
        return None
    sizes = parent.qkv_sizes if name == "qkv_proj" else [linear.out_features // len(parts)] * len(parts)
    chosen = []
    for part, w in zip(parts, linear.weight.detach().float().split(sizes), strict=True):
        if f"{prefix}.{part}" not in groups:
            chosen.append(quantize_int4(w, 32))
            continue
        q, scale, zero = groups[f"{prefix}.{part}"]
        n, k = w.shape
        if q.shape != (n, k):
            raise ConfigError(f"{prefix}.{part}: the file's int4 groups are {tuple(q.shape)}, the layer {n} x {k}")
        dequant = dequantize_int4(q, scale, zero)
        if (dequant - w).abs().max() > 1e-5 * w.abs().max():  # the file's blocks, decoded two ways
            raise ConfigError(f"{prefix}.{part}: the weight is not the file's int4 blocks any more (changed after "
                              "loading, e.g. an adapter merged); quantize it without the file's groups")
        chosen.append((q.to(torch.int32), scale, zero, dequant))
    return tuple(torch.cat(t) for t in zip(*chosen, strict=True))
