"""Why the MLM recipe trains RoFormer: a probe that only word order solves, three encoders of one size.

Rows of random tokens, each said twice (`a a b b ...`), masked 80/10/10 as in pretraining: at [MASK]
only the neighbour tells the token, and which neighbour depends on the position (a guess scores
1/195). Arms, each from seed 0 on the same batches, AdamW (lr 1e-3, betas 0.9/0.98): transformers'
BertForMaskedLM, llmkit's `bert-2m` (learned positions) and llmkit's `roformer-2m` (rotary). Writes
the accuracy at [MASK] and the loss every 50 steps:

    python benchmarks/mlm_position_probe.py       # benchmarks/results/mlm_position_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_forward import provenance  # noqa: E402

from llmkit import ModelConfig, Transformer  # noqa: E402
from llmkit.data.masking import mask_tokens  # noqa: E402

VOCAB, MASK, SPECIALS = 200, 4, [0, 1, 2, 3, 4]


def build(arm: str):
    """(model, forward(inputs, labels) -> (loss, logits at every position))."""
    torch.manual_seed(0)
    if arm == "transformers-bert":
        import transformers

        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=512, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, max_position_embeddings=512)
        model = transformers.BertForMaskedLM(config)
        return model, lambda x, y: (lambda out: (out.loss, out.logits))(model(input_ids=x, labels=y))
    model = Transformer(ModelConfig.from_preset(arm.removeprefix("llmkit-"), vocab_size=VOCAB))

    def forward(x, y):
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100), logits
    return model, forward


def run(arm: str, steps: int, every: int) -> list[dict]:
    model, forward = build(arm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    curve = []
    for step in range(steps + 1):
        ids = torch.randint(len(SPECIALS), VOCAB, (32, 64), generator=g).repeat_interleave(2, dim=1)
        inputs, labels = mask_tokens(ids, MASK, VOCAB, SPECIALS, g)
        loss, logits = forward(inputs, labels)
        if step % every == 0:
            at = inputs == MASK
            accuracy = (logits.detach().argmax(-1)[at] == ids[at]).float().mean()
            curve.append({"step": step, "loss": round(float(loss), 4), "accuracy_at_mask": round(float(accuracy), 4)})
            print(arm, curve[-1], flush=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return curve


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results/mlm_position_probe.json")
    args = p.parse_args(argv)
    arms = {arm: run(arm, args.steps, args.every) for arm in ("transformers-bert", "llmkit-bert-2m",
                                                                "llmkit-roformer-2m")}
    report = {"benchmark": "mlm_position_probe", "chance": 1 / (VOCAB - len(SPECIALS)), "arms": arms,
              **provenance(argv, "benchmarks/mlm_position_probe.py")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
