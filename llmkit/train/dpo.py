"""Direct preference optimisation (DPO, or IPO) of a policy on preference pairs, on the one training loop.

`run(DPOConfig(...))` fits the policy against a frozen reference (by default the starting policy)
whose log-probs are computed once before training and cached in the run folder; in full or with
LoRA adapters. It logs preference accuracy and margins on held-out pairs at every evaluation and
writes `report.json` / `report.md`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmkit.data import preferences as prefs
from llmkit.data.collate import collate_pairs
from llmkit.files import atomic_write_json
from llmkit.losses import PREFERENCE_LOSSES, check_preference_loss
from llmkit.model import Transformer, load
from llmkit.tokenizer import check_same_tokenizer
from llmkit.train.finetune import FinetuneConfig, prepare_model
from llmkit.train.loop import TrainResult, resolve_device, train
from llmkit.train.memory import peak_rss_mb
from llmkit.train.objectives import dpo_objective, scored_logps
from llmkit.train.preference import PreferenceConfig, pad_id, pairs_section, split_pairs
from llmkit.train.report import run_summary, write_report


@dataclass
class DPOConfig(PreferenceConfig):
    out_dir: str = "runs/dpo"
    beta: float = field(default=0.1, metadata={"help": "strength of the pull toward the reference (> 0)"})
    loss_type: str = field(default="sigmoid", metadata={"help": f"one of {PREFERENCE_LOSSES} (ipo: IPO)"})
    reference: str | None = field(default=None, metadata={"help": "reference model (default: the starting policy)"})
    precompute_ref_logps: bool = field(default=True, metadata={"help": "compute reference log-probs once and "
                                                                         "cache them (the reference leaves memory)"})
    lora_r: int = field(default=0, metadata={"help": "> 0: train LoRA adapters of this rank instead of all weights"})
    lora_alpha: float = 16.0
    lora_targets: str = field(default="q,k,v,o,gate,up,down", metadata={"help": "LoRA target modules, or 'all'"})


@torch.no_grad()
def reference_logps(reference: Transformer, rows: list[dict], pad_id: int, batch_size: int = 16,
                    device=None) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) summed response log-probs under the frozen reference."""
    reference.eval().to(device or reference.device)
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", leave=False):
        chunk = rows[i:i + batch_size]
        batch = {k: v.to(reference.device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = scored_logps(reference, batch)[0].float().cpu()
        n = len(chunk)
        out += list(zip(logps[:n].tolist(), logps[n:].tolist(), strict=True))
    return out


def _cached_reference_logps(path: Path, key: dict, compute) -> list:
    """Reference log-probs saved beside the run, reused when the same reference and data ask again."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["logps"]
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "logps": logps})
    return logps


@torch.no_grad()
def _logp_probe(model: Transformer, rows: list[dict], pad: int, device) -> dict:
    """Mean summed log-prob of the held-out chosen and rejected responses under `model`."""
    was_training = model.training
    model.eval().to(device)
    chosen, rejected = [], []
    for batch in prefs.fixed_batches(rows, 16, pad):
        batch = {k: v.to(device) for k, v in batch.items()}
        lp = scored_logps(model, batch)[0].float()
        c, r = lp.chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    model.train(was_training)
    return {"chosen": sum(chosen) / len(chosen), "rejected": sum(rejected) / len(rejected)}


def run(config: DPOConfig) -> TrainResult:
    config.validate()
    check_preference_loss(config.beta, config.loss_type)
    torch.manual_seed(config.seed)
    policy, tokenizer = load(config.model, dtype=torch.float32)
    if config.reference:
        reference, ref_tokenizer = load(config.reference, dtype=torch.float32)
        check_same_tokenizer(tokenizer, ref_tokenizer, f"reference model {config.reference!r}")
    else:
        reference = None
    train_pairs, eval_pairs = split_pairs(config)
    pad = pad_id(tokenizer)
    rows = prefs.tokenize_pairs(train_pairs, tokenizer, config.max_len)
    eval_rows = prefs.tokenize_pairs(eval_pairs, tokenizer, config.max_len)
    ref_model = reference if reference is not None else policy
    device = resolve_device(config.device)
    out_dir = Path(config.out_dir)
    if config.precompute_ref_logps:
        for name, part in (("train", rows), ("eval", eval_rows)):
            key = {"reference": config.reference or config.model, "data": config.data, "eval_data": config.eval_data,
                   "pairs": len(part), "max_len": config.max_len, "seed": config.seed, "split": name}
            logps = _cached_reference_logps(out_dir / f"reference_logps_{name}.json", key,
                                            lambda part=part: reference_logps(ref_model, part, pad, device=device))
            for row, lp in zip(part, logps, strict=True):
                row["ref_logps"] = lp
        reference = None  # not needed any more: free its memory
    elif reference is None:
        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.requires_grad_(False).eval().to(device)
    before = _logp_probe(policy, eval_rows, pad, device)
    save_weights = load_weights = None
    if config.lora_r > 0:  # LoRA as `llmkit finetune` does it: adapters trained, checkpoints in peft's format
        lora = FinetuneConfig(method="lora", lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                              lora_targets=config.lora_targets)
        policy, save_weights, load_weights = prepare_model(lora, policy)
    eval_batches = prefs.fixed_batches(eval_rows, config.batch_size, pad)
    result = train(policy, dpo_objective(config.beta, config.loss_type, reference),
                   prefs.pair_batches(rows, config.batch_size, pad, config.seed), config, config.out_dir,
                   eval_batches=lambda: eval_batches, write_extra=tokenizer.save_pretrained,
                   run_config=dataclasses.asdict(config), save_weights=save_weights, load_weights=load_weights)
    after = _logp_probe(policy, eval_rows, pad, device)
    report = {"command": "dpo", "config": dataclasses.asdict(config), "train_pairs": len(rows),
              "eval_pairs": len(eval_rows), **run_summary(result), "peak_rss_mb": round(peak_rss_mb()),
              "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
              "held_out_logps": {"before": before, "after": after,
                                 "chosen_change": after["chosen"] - before["chosen"],
                                 "rejected_change": after["rejected"] - before["rejected"]}}
    write_report(out_dir, f"DPO ({config.loss_type}, beta={config.beta})", report, [
        pairs_section(config, len(rows), len(eval_rows)),
        "Held-out summed response log-probs under the policy (before -> after):\n"
        f"chosen {before['chosen']:.2f} -> {after['chosen']:.2f}, "
        f"rejected {before['rejected']:.2f} -> {after['rejected']:.2f}"])
    return dataclasses.replace(result, report=report)
