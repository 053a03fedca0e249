"""A reward model from preference pairs (Bradley-Terry), on the one training loop.

`run(RewardConfig(...))` turns an LM checkpoint into a reward model (the same Transformer with a
scalar `score` head on the last real token, `num_labels=1`), fits it to the pairs, logs preference
accuracy and margins on held-out pairs at every evaluation and writes `report.json` / `report.md`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from llmkit.data import preferences as prefs
from llmkit.errors import ConfigError
from llmkit.model import Transformer, load
from llmkit.tokenizer import Tokenizer
from llmkit.train.loop import TrainResult, train
from llmkit.train.objectives import reward_objective
from llmkit.train.preference import PreferenceConfig, pad_id, pairs_section, split_pairs
from llmkit.train.report import run_summary, write_report


@dataclass
class RewardConfig(PreferenceConfig):
    out_dir: str = "runs/reward"
    eval_hhh: bool = field(default=False, metadata={"help": "also report accuracy on BIG-bench hhh_alignment"})


def reward_model_from(lm: Transformer) -> Transformer:
    """The LM with a scalar head: same body, `score` (d_model -> 1) freshly initialised."""
    config = lm.config.replace(num_labels=1)
    model = Transformer(config)
    state = {k: v for k, v in lm.state_dict().items() if k in model.state_dict()}
    missing, _ = model.load_state_dict(state, strict=False)
    if set(missing) - {"score.weight", "lm_head.weight"}:
        raise ConfigError(f"cannot build a reward model from this checkpoint: missing {missing}")
    model.tie_weights()
    return model


@torch.no_grad()
def pair_accuracy(model: Transformer, tokenizer: Tokenizer, pairs, max_len: int = 256, batch_size: int = 8) -> dict:
    """Share of pairs the reward model ranks the right way round, and the mean reward margin."""
    model.eval()
    rows = prefs.tokenize_pairs(pairs, tokenizer, max_len)
    right, margins = 0, []
    for batch in tqdm(prefs.fixed_batches(rows, batch_size, pad_id(tokenizer)), desc="score pairs", leave=False):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        _, m = reward_objective(model, batch)
        n = batch["input_ids"].shape[0] // 2
        right += round(m["accuracy"].item() * n)
        margins.append(m["margin"].item() * n)
    return {"pairs": len(rows), "accuracy": right / len(rows), "mean_margin": sum(margins) / len(rows)}


def run(config: RewardConfig) -> TrainResult:
    config.validate()
    torch.manual_seed(config.seed)
    lm, tokenizer = load(config.model, dtype=torch.float32)
    model = reward_model_from(lm)
    del lm
    train_pairs, eval_pairs = split_pairs(config)
    hhh = prefs.hhh_alignment() if config.eval_hhh else None  # before training: missing data fails in seconds
    pad = pad_id(tokenizer)
    rows = prefs.tokenize_pairs(train_pairs, tokenizer, config.max_len)
    eval_rows = prefs.fixed_batches(prefs.tokenize_pairs(eval_pairs, tokenizer, config.max_len), config.batch_size,
                                    pad)
    result = train(model, reward_objective, prefs.pair_batches(rows, config.batch_size, pad, config.seed),
                   config, config.out_dir, eval_batches=lambda: eval_rows, write_extra=tokenizer.save_pretrained,
                   run_config=dataclasses.asdict(config))
    report = {"command": "reward", "config": dataclasses.asdict(config), "train_pairs": len(rows),
              "eval_pairs": len(eval_pairs), **run_summary(result)}
    sections = [pairs_section(config, len(rows), len(eval_pairs))]
    if hhh is not None:
        # the dialogues run to ~500 tokens; a shorter model context cuts them from the left (the prompt first)
        max_len = min(512, model.config.max_seq_len)
        h = report["hhh_alignment"] = {**pair_accuracy(model, tokenizer, hhh, max_len=max_len),
                                       "max_len": max_len}
        sections.append(f"BIG-bench hhh_alignment: accuracy {h['accuracy']:.3f} on {h['pairs']} pairs "
                        f"(chance 0.5; at most {max_len} tokens each), mean margin {h['mean_margin']:.3f}")
    write_report(config.out_dir, "Reward model (Bradley-Terry)", report, sections)
    return dataclasses.replace(result, report=report)
