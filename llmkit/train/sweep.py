"""`llmkit scaling sweep`: a grid of small Llama-style models (sizes x token budgets) pretrained on the
speedrun's data pipeline, one JSONL row per finished run: N (non-embedding parameters), D (tokens
seen), C = 6ND, the final validation loss, wall time and energy.

Resumable at two levels: a run whose row is in `sweep.jsonl` is never redone, and a run killed midway
continues from its last checkpoint (`save_every`). The data (packaged text -> cleaned mixture ->
byte-level BPE -> shards) is prepared once into `out_dir/data` and reused, or `data` names existing
shards. Every run sees the same held-out batches, so the losses are comparable; a run's schedule
ends with its own budget (cosine to `min_lr_ratio`), as Chinchilla's runs did.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llmkit.config import PRESETS, ModelConfig
from llmkit.data.prepare import PrepareConfig, parse_weights, prepare, read_documents
from llmkit.data.shards import tokenize_prepared
from llmkit.errors import ConfigError, DataError
from llmkit.files import atomic_write_text
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import pretrain
from llmkit.train.pretrain import PretrainConfig

ROWS = "sweep.jsonl"


@dataclass
class SweepConfig:
    out_dir: str = field(default="runs/scaling", metadata={"help": "rows (sweep.jsonl), data and one folder per run"})
    sizes: list[str] = field(default_factory=lambda: ["2x64", "2x96", "3x128", "4x160", "4x192", "6x256"], metadata={
        "help": "model sizes as LAYERSxWIDTH (Llama-style, head_dim 32, d_ff ~8/3 width) or preset names"})
    tokens: list[int] = field(default_factory=lambda: [250_000, 500_000, 1_000_000], metadata={
        "help": "token budgets D; every size trains once at each"})
    data: str = field(default="", metadata={"help": "existing token shards (train/, val/, tokenizer/); "
                                                    "default: prepare `sources` into OUT_DIR/data"})
    sources: str = field(default="wikipedia:0.5,bbcnews:0.5", metadata={"help": "NAME:WEIGHT,... (the speedrun's)"})
    vocab_size: int = 4096
    val_fraction: float = field(default=0.01, metadata={"help": "share of documents held out (prepared data only)"})
    context: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    precision: str = field(default="fp32", metadata={"help": "fp32 or bf16 (autocast)"})
    eval_batches: int = field(default=20, metadata={"help": "held-out batches scored at the end of each run"})
    save_every: int = field(default=200, metadata={"help": "checkpoint every N steps, so a killed run resumes "
                                                           "(0: only at the end)"})
    seed: int = 1337
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's own); the "
                                                                "smallest models run faster on one"})


_SIZE = re.compile(r"^(\d+)x(\d+)$")


def size_config(spec: str, vocab_size: int, context: int) -> ModelConfig:
    """'4x128' -> 4 layers of width 128 (heads of 32, SwiGLU of ~8/3 width rounded to 32), tied
    embeddings; or a preset's shape with this vocabulary."""
    if spec in PRESETS:
        return ModelConfig.from_preset(spec, vocab_size=vocab_size, max_seq_len=max(context, 64))
    m = _SIZE.match(spec)
    if not m or int(m[1]) < 1 or int(m[2]) < 32 or int(m[2]) % 32:
        raise ConfigError(f"size {spec!r}: expected LAYERSxWIDTH with a width that is a multiple of 32 "
                          f"(e.g. 4x128), or a preset ({sorted(PRESETS)})")
    layers, width = int(m[1]), int(m[2])
    return ModelConfig.from_dict(dict(
        PRESETS["llama-2m"], name=spec, vocab_size=vocab_size, n_layer=layers, d_model=width, n_head=width // 32,
        n_kv_head=width // 32, d_ff=32 * round(8 * width / 3 / 32), max_seq_len=max(context, 64)))


def _read_done(path: Path) -> dict[tuple[str, int], dict]:
    """Finished rows by (size, budget); a half-written last line (a kill during the append) is dropped."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(row["size"], int(row["budget"]))] = row
    return done


def prepare_data(config: SweepConfig, root: Path) -> Path:
    """The speedrun's pipeline, once: packaged text -> cleaned mixture -> byte-level BPE -> shards. The
    settings are recorded beside the shards; a sweep asking for other data is refused, since its rows
    would not compare with the ones already there."""
    if config.data:
        return Path(config.data)
    data, shards = root / "data", root / "shards"
    settings = {k: getattr(config, k) for k in ("sources", "vocab_size", "val_fraction", "seed")}
    recorded = shards / "sweep_data.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before != settings:
            changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            raise ConfigError(f"{shards} was prepared with other data settings (setting: (then, now)) {changed}; "
                              "use another --out-dir, or the same settings")
        return shards
    prepare(parse_weights(config.sources), data, PrepareConfig(val_fraction=config.val_fraction, seed=config.seed),
            progress=True)
    tokenizer = Tokenizer.train([d.text for d in read_documents(data / "train.jsonl")], config.vocab_size,
                                show_progress=False)
    tokenize_prepared(data, tokenizer, shards, progress=False)
    tokenizer.save_pretrained(shards / "tokenizer")
    atomic_write_text(recorded, json.dumps(settings) + "\n")  # last: it marks the shards complete
    return shards


def sweep(config: SweepConfig) -> Path:
    """Train every (size, budget) not yet in OUT_DIR/sweep.jsonl; returns the rows' path."""
    if not config.sizes or not config.tokens:
        raise ConfigError("a sweep needs at least one size and one token budget")
    if any(t <= 0 for t in config.tokens):
        raise ConfigError(f"token budgets must be positive, got {config.tokens}")
    per_step = config.batch_size * config.context
    root = Path(config.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    shards = prepare_data(config, root)
    if pretrain.train_and_val_dirs(shards)[1] is None:
        raise DataError(f"{shards} has no validation shards (val/); the sweep compares held-out losses. Hold out "
                        f"more documents (--val-fraction, now {config.val_fraction}) or give shards with a val/ folder")
    vocab = Tokenizer.from_pretrained(shards / "tokenizer").vocab_size if (shards / "tokenizer").is_dir() \
        else config.vocab_size
    models = {s: size_config(s, vocab, config.context) for s in config.sizes}  # all checked before any training
    rows_path = root / ROWS
    done = _read_done(rows_path)
    if rows_path.is_file():  # rewrite without a torn last line, so the next append starts on its own line
        atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    grid = [(s, t) for s in config.sizes for t in sorted(config.tokens)]
    todo = [(s, t) for s, t in grid if (s, t) not in done]
    bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="sweep", unit="run", dynamic_ncols=True)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        for size, budget in todo:
            bar.set_postfix(size=size, tokens=budget)
            row = _train_one(config, models[size], size, budget, shards, root, per_step)
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return rows_path


def _train_one(config: SweepConfig, model_config: ModelConfig, size: str, budget: int, shards: Path, root: Path,
               per_step: int) -> dict[str, Any]:
    steps = max(1, math.ceil(budget / per_step))
    run_dir = root / "runs" / f"{size}-{budget}"
    preset_dir = run_dir / "init"  # the size as a config folder pretrain can start from
    if not (preset_dir / "config.json").is_file():
        torch.manual_seed(config.seed)  # the same initial weights for a size at every budget
        Transformer(model_config).save_pretrained(preset_dir)
    pre = PretrainConfig(
        model=str(preset_dir), data=str(shards), out_dir=str(run_dir / "train"), context=config.context,
        batch_size=config.batch_size, max_steps=steps, lr=config.lr,
        warmup_steps=min(config.warmup_steps, max(0, steps // 10)), min_lr_ratio=config.min_lr_ratio,
        precision=config.precision, eval_every=0, eval_batches=config.eval_batches,
        save_every=config.save_every, keep_last=1, seed=config.seed, log_every=10, progress=False, resume=True)
    started = time.perf_counter()
    result = pretrain.run(pre)
    evals = [r for r in result.history if "val_loss" in r]
    model = Transformer(model_config)
    N = model.num_parameters(exclude_embeddings=True)
    D = steps * per_step
    train = [r for r in result.history if "loss" in r]
    return {"size": size, "budget": budget, "n_layer": model_config.n_layer, "d_model": model_config.d_model,
            "N": N, "N_total": model.num_parameters(), "D": D, "C": 6 * N * D, "steps": steps,
            "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1].get("val_bpb"),
            "train_loss": train[-1]["loss"] if train else None, "wall_s": round(time.perf_counter() - started, 2),
            "energy_j": result.energy.get("joules"), "run": str(run_dir),
            "setup": {k: getattr(config, k) for k in ("context", "batch_size", "lr", "precision", "seed")}}
