"""Calibration statistics: what each linear layer of a model sees on real text.

Wanda, llama.cpp's importance matrix, GPTQ and structured pruning all start from the same numbers:
for every `nn.Linear`, the sum over calibration tokens of each input channel's squared activation
(and, for GPTQ, the whole input Gram matrix X^T X). One pass of forward hooks collects them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from llmkit.errors import ConfigError


@dataclass
class Calibration:
    """Per linear layer (by module name): sum of squared inputs per input channel, and tokens seen."""

    sum_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # X^T X, only when asked for

    def mean_sq(self, name: str) -> torch.Tensor:
        """llama.cpp's importance: the mean squared activation of each input channel."""
        return self.sum_sq[name] / max(self.tokens[name], 1)

    def norm(self, name: str) -> torch.Tensor:
        """Wanda's ||X_j||_2: the L2 norm of input channel j over all calibration tokens."""
        return self.sum_sq[name].sqrt()


def linear_layers(model: nn.Module, include_head: bool = False) -> dict[str, nn.Linear]:
    """The linear layers of the blocks (and the LM head if asked), by module name; routers excluded."""
    layers = {f"blocks.{n}": m for n, m in model.blocks.named_modules()
              if type(m) is nn.Linear and not n.endswith("router")}
    if include_head and type(getattr(model, "lm_head", None)) is nn.Linear:
        layers["lm_head"] = model.lm_head
    return layers


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], include_head: bool = False,
              gram: bool = False) -> Calibration:
    """Run `batches` of token ids (batch, seq) through `model` and record each linear layer's inputs."""
    stats = Calibration()
    layers = linear_layers(model, include_head)

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            stats.sum_sq[name] = stats.sum_sq.get(name, 0) + (x * x).sum(0)
            stats.tokens[name] = stats.tokens.get(name, 0) + x.shape[0]
            if gram:
                stats.gram[name] = stats.gram.get(name, 0) + x.T @ x
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        was_training = model.training
        model.eval()
        seen = 0
        for ids in batches:
            model.hidden_states(ids) if not include_head else model(ids)
            seen += ids.numel()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ConfigError("calibration needs at least one batch of tokens; got none")
    return stats


def source_batches(tokenizer, source: str = "wikipedia", max_tokens: int = 16384, seq_len: int = 256,
                   device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Calibration batches from a packaged text source (`llmkit data fetch` names): its training documents
    only (`data.split`'s held-out rule), so held-out perplexity on the same source stays clean."""
    from llmkit.data.corpora import documents
    from llmkit.data.split import is_held_out

    texts = (d.text for d in documents(source) if not is_held_out(f"{d.source}\0{d.id}", HELD_OUT))
    return token_batches(tokenizer, texts, seq_len, max_tokens, device)


HELD_OUT = 0.01  # the share of a source's documents never used for calibration (as `data prepare` splits)


def token_batches(tokenizer, texts: Iterable[str], seq_len: int = 256, max_tokens: int = 16384,
                  device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Calibration text -> rows of `seq_len` token ids (at most `max_tokens` in all), as llama.cpp's imatrix chunks it."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    rows = len(ids) // seq_len
    if not rows:
        raise ConfigError(f"calibration text gave {len(ids)} tokens; expected at least seq_len={seq_len}")
    return list(torch.tensor(ids[:rows * seq_len], device=device).view(rows, 1, seq_len))
