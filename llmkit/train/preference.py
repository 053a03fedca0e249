"""Learning from preference pairs on the one training loop: a reward model (Bradley-Terry) and DPO/IPO.

`train_reward(RewardConfig(...))` turns an LM checkpoint into a reward model (the same Transformer
with a scalar `score` head on the last real token, `num_labels=1`) and fits it to the pairs;
`train_dpo(DPOConfig(...))` fits the policy itself, against a frozen reference (by default the
starting policy) whose log-probs are computed once before training and cached in the run folder.
Both log preference accuracy and margins on held-out pairs at every evaluation and write
`report.json` / `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmkit.data import preferences as prefs
from llmkit.data.collate import collate_pairs
from llmkit.errors import ConfigError
from llmkit.files import atomic_write_json, atomic_write_text
from llmkit.model import Transformer, load
from llmkit.tokenizer import Tokenizer
from llmkit.train.align import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    check_beta,
    preference_loss,
    sequence_logps,
)
from llmkit.train.loop import LoopConfig, TrainResult, resolve_device, train

PACKAGED = ("movie_reviews", "arithmetic", "hhh_alignment")


@dataclass
class PreferenceConfig(LoopConfig):
    model: str = field(default="", metadata={"help": "an LM checkpoint or run folder, .gguf or registry name"})
    data: str = field(default="movie_reviews", metadata={"help": f"a JSONL file of pairs or one of {PACKAGED}"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out pairs (default: the source's test "
                                                                   "split, or 10%% of a JSONL file)"})
    train_pairs: int = field(default=2000, metadata={"help": "pairs drawn from a packaged source"})
    eval_pairs: int = 200
    max_len: int = field(default=128, metadata={"help": "tokens per prompt + response (prompt cut first)"})
    batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch"})
    out_dir: str = "runs/preference"
    lr: float = 1e-4
    warmup_steps: int = 10
    eval_every: int = 50
    save_every: int = 0
    max_steps: int = 200


@dataclass
class RewardConfig(PreferenceConfig):
    out_dir: str = "runs/reward"
    eval_hhh: bool = field(default=False, metadata={"help": "also report accuracy on BIG-bench hhh_alignment"})


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


# ---- data ------------------------------------------------------------------------------------


def load_pairs(spec: str, split: str, n: int, seed: int) -> list[prefs.PreferencePair]:
    if spec == "movie_reviews":
        return prefs.movie_review_pairs(n, split, seed=seed)
    if spec == "arithmetic":
        return prefs.arithmetic_pairs(n, seed=seed if split == "train" else seed + 10_000)
    if spec == "hhh_alignment":
        if split == "train":
            raise ConfigError("hhh_alignment (221 pairs) is for evaluation only; train on other pairs and pass "
                              "--eval-data hhh_alignment (or --eval-hhh for `llmkit reward`)")
        return prefs.hhh_alignment()
    return prefs.held_out_pairs(prefs.read_preference_pairs(spec), split)


def _splits(config: PreferenceConfig) -> tuple[list, list]:
    train_pairs = load_pairs(config.data, "train", config.train_pairs, config.seed)
    if config.eval_data:
        eval_pairs = load_pairs(config.eval_data, "test", config.eval_pairs, config.seed)
    else:
        eval_pairs = load_pairs(config.data, "test", config.eval_pairs, config.seed)
    return train_pairs, eval_pairs[:config.eval_pairs]


def load_model(spec: str) -> tuple[Transformer, Tokenizer]:
    """`llmkit.load`, plus a training run's folder (its newest checkpoint), in float32."""
    from llmkit.train import checkpoint

    if Path(spec).is_dir() and (found := checkpoint.latest(Path(spec))) is not None:
        spec = str(found)
    return load(spec, dtype=torch.float32)


def _pad_id(tokenizer: Tokenizer) -> int:
    for i in (tokenizer.pad_id, tokenizer.eos_id, 0):
        if i is not None:
            return i
    return 0


def check_same_tokenizer(a: Tokenizer, b: Tokenizer, what: str) -> None:
    """Log-prob ratios and distillation compare the same token ids, so two models must share a tokenizer."""
    va, vb = a.backend.get_vocab(), b.backend.get_vocab()
    if va != vb or (a.bos_id, a.eos_id) != (b.bos_id, b.eos_id):
        differ = sum(1 for t, i in va.items() if vb.get(t) != i) + len(set(vb) - set(va))
        raise ConfigError(f"{what} has a different tokenizer from the policy ({len(vb)} vs {len(va)} tokens, "
                          f"{differ} tokens differ, bos/eos {b.bos_id}/{b.eos_id} vs {a.bos_id}/{a.eos_id}); "
                          "expected the same tokenizer, since their token log-probs are compared id by id")


# ---- reward model ----------------------------------------------------------------------------


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


def reward_objective(model, batch):
    rewards = model.classify(batch["input_ids"], batch["attention_mask"])[:, 0].float()
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, {"loss": loss.detach(), "accuracy": (chosen > rejected).float().mean(),
                  "margin": (chosen - rejected).mean().detach(), "reward_chosen": chosen.mean().detach(),
                  "reward_rejected": rejected.mean().detach()}


@torch.no_grad()
def pair_accuracy(model: Transformer, tokenizer: Tokenizer, pairs, max_len: int = 256, batch_size: int = 8) -> dict:
    """Share of pairs the reward model ranks the right way round, and the mean reward margin."""
    model.eval()
    rows = prefs.tokenize_pairs(pairs, tokenizer, max_len)
    right, margins = 0, []
    for batch in tqdm(prefs.fixed_batches(rows, batch_size, _pad_id(tokenizer)), desc="score pairs", leave=False):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        _, m = reward_objective(model, batch)
        n = batch["input_ids"].shape[0] // 2
        right += round(m["accuracy"].item() * n)
        margins.append(m["margin"].item() * n)
    return {"pairs": len(rows), "accuracy": right / len(rows), "mean_margin": sum(margins) / len(rows)}


def train_reward(config: RewardConfig) -> dict:
    config.validate()
    torch.manual_seed(config.seed)
    lm, tokenizer = load_model(config.model)
    model = reward_model_from(lm)
    del lm
    train_pairs, eval_pairs = _splits(config)
    pad = _pad_id(tokenizer)
    rows = prefs.tokenize_pairs(train_pairs, tokenizer, config.max_len)
    eval_rows = prefs.fixed_batches(prefs.tokenize_pairs(eval_pairs, tokenizer, config.max_len), config.batch_size,
                                    pad)
    result = train(model, reward_objective, prefs.pair_batches(rows, config.batch_size, pad, config.seed),
                   config, config.out_dir, eval_batches=lambda: eval_rows, write_extra=tokenizer.save_pretrained,
                   run_config=dataclasses.asdict(config))
    report = {"command": "reward", "config": dataclasses.asdict(config), "train_pairs": len(rows),
              "eval_pairs": len(eval_pairs), **_summary(result)}
    if config.eval_hhh:
        report["hhh_alignment"] = pair_accuracy(model, tokenizer, prefs.hhh_alignment(), max_len=512)
    _write_report(Path(config.out_dir), report, "Reward model (Bradley-Terry)")
    return report


# ---- DPO -------------------------------------------------------------------------------------


def _policy_logps(model, batch):
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(logits, batch["labels"])


def dpo_objective(beta: float, loss_type: str = "sigmoid", reference: Transformer | None = None):
    """`(model, batch) -> (loss, metrics)` for DPO/IPO; reference log-probs come from the batch
    (`ref_logps`, precomputed) or from running `reference`."""
    check_beta(beta)

    def objective(model, batch):
        logps, tokens = _policy_logps(model, batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            with torch.no_grad():
                ref = _policy_logps(reference, batch)[0]
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        tc, tr = tokens.chunk(2)
        loss, chosen, rejected = preference_loss(pc, pr, rc, rr, beta, loss_type, tc, tr)
        return loss, {"loss": loss.detach(), "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
                      "margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).float().mean(),
                      "logps_chosen": pc.detach().mean(), "logps_rejected": pr.detach().mean()}

    return objective


@torch.no_grad()
def reference_logps(reference: Transformer, rows: list[dict], pad_id: int, batch_size: int = 16,
                    device=None) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) summed response log-probs under the frozen reference."""
    reference.eval().to(device or reference.device)
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="reference log-probs", leave=False):
        chunk = rows[i:i + batch_size]
        batch = {k: v.to(reference.device) for k, v in collate_pairs(chunk, pad_id).items()}
        logps = _policy_logps(reference, batch)[0].float().cpu()
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


def train_dpo(config: DPOConfig) -> dict:
    config.validate()
    check_beta(config.beta)
    if config.loss_type not in PREFERENCE_LOSSES:
        raise ConfigError(f"loss_type={config.loss_type!r}; expected one of {PREFERENCE_LOSSES}")
    torch.manual_seed(config.seed)
    policy, tokenizer = load_model(config.model)
    if config.reference:
        reference, ref_tokenizer = load_model(config.reference)
        check_same_tokenizer(tokenizer, ref_tokenizer, f"reference model {config.reference!r}")
    else:
        reference = None
    train_pairs, eval_pairs = _splits(config)
    pad = _pad_id(tokenizer)
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
        import copy

        reference = copy.deepcopy(policy)
    if reference is not None:
        reference.requires_grad_(False).eval().to(device)
    before = _logp_probe(policy, eval_rows, pad, device)
    save_weights = load_weights = None
    if config.lora_r > 0:  # LoRA as `llmkit finetune` does it: adapters trained, checkpoints in peft's format
        from llmkit.train.finetune import FinetuneConfig, prepare_model

        lora = FinetuneConfig(method="lora", lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                              lora_targets=config.lora_targets)
        policy, save_weights, load_weights = prepare_model(lora, policy)
    eval_batches = prefs.fixed_batches(eval_rows, config.batch_size, pad)
    result = train(policy, dpo_objective(config.beta, config.loss_type, reference),
                   prefs.pair_batches(rows, config.batch_size, pad, config.seed), config, config.out_dir,
                   eval_batches=lambda: eval_batches, write_extra=tokenizer.save_pretrained,
                   run_config=dataclasses.asdict(config), save_weights=save_weights, load_weights=load_weights)
    after = _logp_probe(policy, eval_rows, pad, device)
    from llmkit.train.finetune import peak_rss_mb

    report = {"command": "dpo", "config": dataclasses.asdict(config), "train_pairs": len(rows),
              "eval_pairs": len(eval_rows), **_summary(result), "peak_rss_mb": round(peak_rss_mb()),
              "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
              "held_out_logps": {"before": before, "after": after,
                                 "chosen_change": after["chosen"] - before["chosen"],
                                 "rejected_change": after["rejected"] - before["rejected"]}}
    _write_report(out_dir, report, f"DPO ({config.loss_type}, beta={config.beta})")
    return report


@torch.no_grad()
def _logp_probe(model: Transformer, rows: list[dict], pad: int, device) -> dict:
    """Mean summed log-prob of the held-out chosen and rejected responses under `model`."""
    was_training = model.training
    model.eval().to(device)
    chosen, rejected = [], []
    for batch in prefs.fixed_batches(rows, 16, pad):
        batch = {k: v.to(device) for k, v in batch.items()}
        lp = _policy_logps(model, batch)[0].float()
        c, r = lp.chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    model.train(was_training)
    return {"chosen": sum(chosen) / len(chosen), "rejected": sum(rejected) / len(rejected)}


# ---- reports ---------------------------------------------------------------------------------


def _summary(result: TrainResult) -> dict:
    evals = [r for r in result.history if "val_loss" in r]
    return {"steps": result.step, "stopped": result.stopped, "checkpoint": str(result.last_checkpoint),
            "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
            "evals": evals}


def _write_report(out_dir: Path, report: dict, title: str) -> None:
    atomic_write_json(out_dir / "report.json", report)
    lines = [f"# {title}", "", f"- model: `{report['config']['model']}`, data: `{report['config']['data']}` "
             f"({report['train_pairs']} train / {report['eval_pairs']} held-out pairs), seed {report['config']['seed']}",
             f"- steps: {report['steps']} ({report['stopped']}); checkpoint: `{report['checkpoint']}`", "",
             "| step | val loss | val accuracy | val margin |", "|---|---|---|---|"]
    for r in report["evals"]:
        lines.append(f"| {r['step']} | {r['val_loss']:.4f} | {r.get('val_accuracy', math.nan):.3f} | "
                     f"{r.get('val_margin', math.nan):.3f} |")
    if "hhh_alignment" in report:
        h = report["hhh_alignment"]
        lines += ["", f"BIG-bench hhh_alignment: accuracy {h['accuracy']:.3f} on {h['pairs']} pairs "
                      f"(chance 0.5), mean margin {h['mean_margin']:.3f}"]
    if "held_out_logps" in report:
        h = report["held_out_logps"]
        lines += ["", "Held-out summed response log-probs under the policy (before -> after):",
                  f"chosen {h['before']['chosen']:.2f} -> {h['after']['chosen']:.2f}, "
                  f"rejected {h['before']['rejected']:.2f} -> {h['after']['rejected']:.2f}"]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
