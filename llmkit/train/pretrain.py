"""Pretraining: next-token prediction on token shards, through the one training loop.

`run(PretrainConfig(...))` checks every input before any compute (the data folder has shards,
the context fits the model, the vocabulary fits, a resumed checkpoint has the same model), builds
the model (a preset, or a checkpoint to continue from), and runs `train` with the causal-LM
objective. Under `torchrun` each rank reads its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit.analysis.plots import expert_load_band, plot_expert_load
from llmkit.config import PRESETS, ModelConfig
from llmkit.data.shards import META, ShardLoader, read_meta
from llmkit.errors import ConfigError, DataError
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import distributed as dist_
from llmkit.train.loop import LoopConfig, TrainResult, resolve_device, train
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.report import run_summary, write_report


@dataclass
class PretrainConfig(LoopConfig):
    model: str = field(default="llama-4m", metadata={"help": "a preset name or a checkpoint folder to continue"})
    data: str = field(default="", metadata={"help": "token shards: a folder with train/ (and val/) shard folders"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder copied into checkpoints "
                                                                  "(default: DATA/tokenizer if present)"})
    out_dir: str = field(default="runs/pretrain", metadata={"help": "metrics, checkpoints and report"})
    context: int = field(default=256, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch on each process"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    distributed: str = field(default="auto", metadata={"help": "auto, none, ddp or fsdp (under torchrun)"})


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
    if Path(config.model).is_dir():
        model = Transformer.from_pretrained(config.model, dtype=torch.float32)
        if vocab_size > model.config.vocab_size:
            raise ConfigError(f"the shards use {vocab_size} token ids but {config.model} has a vocabulary of "
                              f"{model.config.vocab_size}")
    elif config.model in PRESETS:
        model = Transformer(ModelConfig.from_preset(config.model, vocab_size=vocab_size))
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
    torch.manual_seed(config.seed)  # the initial weights are part of the run's identity
    model = build_model(config, meta["vocab_size"])
    tokenizer_dir = tokenizer_folder(config)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() else None
    if config.tokenizer and tokenizer is None:
        raise ConfigError(f"tokenizer folder {tokenizer_dir} has no tokenizer.json")

    world = dist_.init(resolve_device(config.device))
    data = ShardLoader(train_dir, config.batch_size, config.context, seed=config.seed, rank=world.rank,
                       world_size=world.size)
    eval_batches = held_out_batches(val_dir, config, world) if val_dir is not None else None
    bytes_per_token = _bytes_per_token(eval_batches(), tokenizer) if eval_batches else None
    try:
        result = train(model, causal_lm_loss, data, config, config.out_dir, model_config=model.config,
                       eval_batches=eval_batches, bytes_per_token=bytes_per_token,
                       tokens_per_step=config.batch_size * config.context * config.grad_accum * world.size,
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
    if world.is_main:
        write_report(config.out_dir, f"Pretraining `{config.model}`", report, sections, plots)
    return dataclasses.replace(result, report=report)
