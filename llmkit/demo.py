"""The main job until the speedrun lands: build, save, reload and run a tiny Llama-style model."""

from __future__ import annotations

from pathlib import Path

import torch

from llmkit.analysis.accounting import model_summary, render_summary
from llmkit.config import ModelConfig
from llmkit.model import Transformer


def run_demo(out: str | Path = "runs/demo", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("llama-tiny")
    model = Transformer(config).eval()
    folder = model.save_pretrained(out)
    print(f"saved {folder}: {sorted(p.name for p in folder.iterdir())}")
    loaded = Transformer.from_pretrained(folder)
    print(render_summary(model_summary(folder)))
    tokens = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits, reloaded = model(tokens), loaded(tokens)
    torch.testing.assert_close(reloaded, logits, rtol=0, atol=0)
    probs = logits[0, -1].softmax(-1)
    top = probs.topk(5)
    print(f"forward pass on {tokens.shape[1]} tokens -> logits {tuple(logits.shape)}; reloaded model matches exactly")
    print("next-token top-5 (random weights): " + ", ".join(f"{i}:{p:.4f}" for p, i in zip(top.values.tolist(),
                                                                                            top.indices.tolist(), strict=False)))
    return folder
