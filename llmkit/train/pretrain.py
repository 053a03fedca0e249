"""Pretraining on token shards through the one training loop: next-token prediction (a decoder) or
masked-language modelling (`objective="mlm"`, an encoder; masks from `llmkit.data.masking`).

`run(PretrainConfig(...))` checks every input before any compute (the data folder has shards,
the context fits the model, the vocabulary fits, a resumed checkpoint has the same model), builds
the model (a preset, or a checkpoint to continue from), and runs `train` with the causal-LM
objective. Under `torchrun` each rank reads its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llmkit.analysis.plots import expert_load_band, plot_expert_load
from llmkit.config import PRESETS, ModelConfig, parse_model_options
from llmkit.data.collate import IGNORE_INDEX
from llmkit.data.masking import MaskedBatches
from llmkit.data.shards import META, ShardLoader, read_meta
from llmkit.errors import ConfigError, DataError
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import distributed as dist_
from llmkit.train import parallel
from llmkit.train.loop import LoopConfig, TrainResult, resolve_device, train
from llmkit.train.objectives import causal_lm_loss, check_objective, mlm_loss
from llmkit.train.report import run_summary, write_report
from llmkit.train.schedules import check_batch_schedule


@dataclass
class PretrainConfig(LoopConfig):
    model: str = field(default="llama-4m", metadata={"help": "a preset name or a checkpoint folder to continue"})
    model_options: str = field(default="", metadata={
        "help": "FIELD=VALUE,... ModelConfig fields changed from the preset (e.g. qk_norm=true,activation=relu2)"})
    data: str = field(default="", metadata={"help": "token shards: a folder with train/ (and val/) shard folders"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder copied into checkpoints "
                                                                  "(default: DATA/tokenizer if present)"})
    out_dir: str = field(default="runs/pretrain", metadata={"help": "metrics, checkpoints and report"})
    context: int = field(default=256, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch on each process"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    distributed: str = field(default="auto", metadata={"help": "auto, none, ddp or fsdp (under torchrun)"})
    objective: Literal["causal", "mlm"] = field(default="causal", metadata={
        "help": "causal: next-token prediction (a decoder); mlm: masked-language modelling (an encoder such as "
                "bert-2m, with a tokenizer from `llmkit tokenizer train --encoder`)"})
    mask_prob: float = field(default=0.15, metadata={"help": "mlm: the share of tokens chosen (80/10/10)"})


def train_and_val_dirs(data: str | Path) -> tuple[Path, Path | None]:
    root = Path(data)
    if not str(data):
        raise ConfigError("no data folder given; expected --data pointing at token shards")
    if (root / "train" / META).is_file():
        return root / "train", (root / "val" if (root / "val" / META).is_file() else None)
    if (root / META).is_file():
        return root, None
    raise DataError(f"{root} has no token shards (no {META} in it or in {root / 'train'}); "
                    "expected the output of `llmkit data tokenize` / `write_shards`")


def build_model(config: PretrainConfig, vocab_size: int) -> Transformer:
    options = parse_model_options(config.model_options)
    if Path(config.model).is_dir():
        if options:
            raise ConfigError(f"model_options={config.model_options!r} with a checkpoint folder: they change a "
                              "preset's shape, and a trained checkpoint keeps its own")
        model = Transformer.from_pretrained(config.model, dtype=torch.float32)
        if vocab_size > model.config.vocab_size:
            raise ConfigError(f"the shards use {vocab_size} token ids but {config.model} has a vocabulary of "
                              f"{model.config.vocab_size}")
    elif config.model in PRESETS:
        model = Transformer(ModelConfig.from_preset(config.model, **{"vocab_size": vocab_size, **options}))
    else:
        raise ConfigError(f"model {config.model!r} is neither a checkpoint folder nor a preset; presets: "
                          f"{sorted(PRESETS)}")
    if config.context > model.config.max_seq_len:
        raise ConfigError(f"context {config.context} is longer than the model's max_seq_len "
                          f"{model.config.max_seq_len}")
    return model


def held_out_batches(val_dir: Path, config: PretrainConfig, world: dist_.World):
    """`eval_batches` for the loop: the first `config.eval_batches` batches of this rank's validation shards."""
    loader = ShardLoader(val_dir, config.batch_size, config.context, seed=0, rank=world.rank,
                         world_size=world.size)
    batches = [loader.next_batch() for _ in range(min(config.eval_batches, loader.batches_per_epoch))]
    return lambda: batches


def tokenizer_folder(config: PretrainConfig) -> Path:
    """Where the run's tokenizer is: `config.tokenizer`, else the one beside the shards."""
    return Path(config.tokenizer) if config.tokenizer else Path(config.data) / "tokenizer"


def _bytes_per_token(batches, tokenizer: Tokenizer | None) -> float | None:
    """UTF-8 bytes per scored token of the validation batches (special tokens carry no bytes)."""
    if tokenizer is None:
        return None
    tokens = sum(y.numel() for _, y in batches)
    text_bytes = sum(len(tokenizer.decode(row.tolist(), skip_special_tokens=True).encode("utf-8"))
                     for _, y in batches for row in y)
    return text_bytes / tokens if text_bytes else None


def run(config: PretrainConfig) -> TrainResult:
    config.validate()
    train_dir, val_dir = train_and_val_dirs(config.data)
    meta = read_meta(train_dir)
    if config.context <= 0 or config.batch_size <= 0:
        raise ConfigError(f"context and batch_size must be positive, got {config.context} and {config.batch_size}")
    check_batch_schedule(config.seq_start, config.seq_warmup, config.batch_start, config.batch_warmup, config.context)
    torch.manual_seed(config.seed)  # the initial weights are part of the run's identity
    model = build_model(config, meta["vocab_size"])
    tokenizer_dir = tokenizer_folder(config)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() else None
    if config.tokenizer and tokenizer is None:
        raise ConfigError(f"tokenizer folder {tokenizer_dir} has no tokenizer.json")
    check_objective(model.config, config.objective)

    world = dist_.init(resolve_device(config.device))
    readers = world  # which slice of each global batch this rank reads
    if parallel.active(config):  # the ranks of one tp group or one pipeline read the same slice
        layout = parallel.check(config, model.config, world.size, config.batch_size, config.context)
        readers = dist_.World(*parallel.data_slice(layout, world.rank))
    data = ShardLoader(train_dir, config.batch_size, config.context, seed=config.seed, rank=readers.rank,
                       world_size=readers.size)
    eval_batches = held_out_batches(val_dir, config, readers) if val_dir is not None else None
    objective, mlm = causal_lm_loss, {}
    if config.objective == "mlm":
        objective = mlm_loss
        data, eval_batches, mlm = _masked(data, eval_batches, tokenizer, model.config.vocab_size, config)
    bytes_per_token = _bytes_per_token(eval_batches(), tokenizer) if eval_batches and not mlm else None
    try:
        result = train(model, objective, data, config, config.out_dir, model_config=model.config,
                       eval_batches=eval_batches, bytes_per_token=bytes_per_token,
                       tokens_per_step=config.batch_size * config.context * config.grad_accum * readers.size,
                       flops_per_token=model.flops_per_token(config.context), strategy=config.distributed,
                       write_extra=tokenizer.save_pretrained if tokenizer is not None else None,
                       run_config=dataclasses.asdict(config))
    finally:
        dist_.shutdown(world)
    report = {"command": "pretrain", "config": dataclasses.asdict(config), **run_summary(result),
              "parameters": model.num_parameters(), "tokens_seen": next(
                  (r["tokens_seen"] for r in reversed(result.history) if "tokens_seen" in r), 0)}
    sections, plots = [f"- data: `{config.data}`, context {config.context}, {report['parameters']:,} parameters, "
                       f"{report['tokens_seen']:,} tokens seen, seed {config.seed}"], {}
    if world.is_main and model.config.n_experts:
        report["expert_load"] = expert_load_band(result.history)
        plots["expert utilisation"] = plot_expert_load(result.history, Path(config.out_dir) / "expert_load.png",
                                                       config.model).name
        band = report["expert_load"]
        sections.append(f"- experts: {model.config.n_experts}, {model.config.experts_per_token} per token; over the "
                        f"last {band['steps_averaged']} steps each expert got {band['min_load']:.2f}-"
                        f"{band['max_load']:.2f} x its even share of tokens (in one step, per layer: the idlest "
                        f"{band['step_min_load']:.2f} x, the busiest {band['step_max_load']:.2f} x)")
    if mlm:
        report["mlm"] = mlm = {**mlm, **_mlm_scores(report["last_eval"])}
        sections.append(_mlm_section(mlm))
    if world.is_main:
        write_report(config.out_dir, f"Pretraining `{config.model}`" + (" (MLM)" if mlm else ""), report, sections,
                     plots)
    return dataclasses.replace(result, report=report)


# ---- masked-language modelling -----------------------------------------------------------------


def _masked(data: ShardLoader, eval_batches, tokenizer: Tokenizer | None, vocab_size: int, config: PretrainConfig):
    """(MLM training batches, held-out batches masked once, the unigram baseline) for objective mlm."""
    mask_id = tokenizer.token_to_id("[MASK]") if tokenizer is not None else None
    if mask_id is None:
        raise ConfigError("objective mlm needs a tokenizer with a [MASK] token (and [PAD]/[CLS]/[SEP]); train one "
                          "with `llmkit tokenizer train --encoder` and pass it with --tokenizer")
    specials = [i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special]
    masked = MaskedBatches(data, mask_id, vocab_size, specials, seed=config.seed, mask_prob=config.mask_prob)
    held_out = None
    if eval_batches is not None:
        fixed = MaskedBatches(None, mask_id, vocab_size, specials, seed=10_007, mask_prob=config.mask_prob)
        batches = [fixed.mask(x) for x, _ in eval_batches()]
        held_out = lambda: batches  # noqa: E731 - the loop calls it for a fresh iterable
    return masked, held_out, unigram_baseline(data, held_out() if held_out else [], specials, vocab_size)


def unigram_baseline(data: ShardLoader, batches: list[dict], specials: list[int], vocab_size: int,
                     sample: int = 10_000_000) -> dict:
    """The accuracy of always predicting the training text's most frequent ordinary token at the held-out
    chosen positions: what masked-token accuracy must beat to show the model learned anything."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    left = sample
    for array in data.arrays:
        piece = np.asarray(array[:left], dtype=np.int64)
        counts += np.bincount(piece, minlength=vocab_size)[:vocab_size]
        left -= len(piece)
        if left <= 0:
            break
    counts[[i for i in specials if i < vocab_size]] = 0
    top = int(counts.argmax())
    labels = torch.cat([b["labels"].flatten() for b in batches]) if batches else torch.zeros(0, dtype=torch.long)
    chosen = labels[labels != IGNORE_INDEX]
    accuracy = float((chosen == top).float().mean()) if len(chosen) else None
    return {"unigram_token": top, "unigram_accuracy": accuracy, "val_chosen_tokens": int(len(chosen))}


def _mlm_scores(last_eval: dict | None) -> dict:
    if not last_eval:
        return {}
    return {"masked_accuracy": last_eval.get("val_accuracy"), "accuracy_at_mask": last_eval.get("val_mask_accuracy"),
            "mlm_perplexity": last_eval.get("val_ppl")}


def _mlm_section(mlm: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f} %"

    return "\n".join([
        "## Masked-language modelling", "",
        "| held-out chosen tokens | masked-token accuracy | at [MASK] positions | unigram baseline accuracy "
        "| MLM perplexity |",
        "|---|---|---|---|---|",
        f"| {mlm.get('val_chosen_tokens', 0):,} | {pct(mlm.get('masked_accuracy'))} | "
        f"{pct(mlm.get('accuracy_at_mask'))} | {pct(mlm.get('unigram_accuracy'))} | "
        f"{mlm.get('mlm_perplexity') or float('nan'):.2f} |", "",
        "15 % of the non-special tokens are chosen; of those 80 % show [MASK], 10 % a random token and 10 % "
        "themselves (so part of the accuracy over all chosen positions is copying; at the [MASK] positions "
        "only the context tells the token). The baseline always predicts the training text's most frequent "
        f"ordinary token (id {mlm.get('unigram_token')}) at the chosen positions."])
