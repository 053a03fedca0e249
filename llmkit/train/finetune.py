"""Fine-tuning: SFT or sequence classification of a pretrained model, in full or with LoRA / QLoRA /
prompt tuning, through the one training loop.

`run(FinetuneConfig(...))` loads the model and tokenizer (HF folder, GGUF or registry name),
reads the data (a JSONL file or a packaged source: `chitchat` conversations, `movie_reviews`
sentiment), splits off a validation set, wraps the model for the method and runs `train`. LoRA and
QLoRA checkpoints hold only the adapter (peft's format, `llmkit merge-lora` folds it in); prompt
tuning saves peft's PROMPT_TUNING folder; full fine-tuning saves HF folders. Every checkpoint also
holds the tokenizer. `report.json` records the trainable parameters, the final validation loss (and
accuracy for classification), the wall time and the peak resident memory.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from llmkit.data.batches import BatchLoader, in_order
from llmkit.data.chat import (
    Example,
    chitchat_conversations,
    conversation_to_example,
    load_examples,
    row_to_example,
    truncate,
)
from llmkit.data.collate import collate_classification, collate_sft
from llmkit.data.labelled import movie_reviews, read_labelled, sentiment_prompt, sentiment_rows
from llmkit.data.split import hold_out
from llmkit.errors import ConfigError, DataError
from llmkit.formats.runs import newest
from llmkit.model import Transformer, load
from llmkit.peft.lora import LoraConfig, apply_lora, read_adapter, save_adapter_state, trainable_parameters
from llmkit.peft.prompt_tuning import ADAPTER_WEIGHTS, PromptTuning, save_prompt_state
from llmkit.progress import bar, phase, warn
from llmkit.tokenizer import Tokenizer
from llmkit.train import parallel
from llmkit.train.loop import LoopConfig, TrainResult, train
from llmkit.train.memory import peak_rss_mb, reset_peak_rss, rss_mb
from llmkit.train.objectives import OBJECTIVES, check_objective
from llmkit.train.report import run_summary, write_report

METHODS = ("full", "lora", "qlora", "prompt")
TASKS = ("sft", "classify")
PACKAGED = ("chitchat", "movie_reviews")


@dataclass
class FinetuneConfig(LoopConfig):
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "HF folder, .gguf file or registry name"})
    method: str = field(default="lora", metadata={"help": f"one of {METHODS}"})
    task: str = field(default="sft", metadata={"help": "sft (masked next-token loss) or classify (head on the "
                                                       "last token; on an encoder, on [CLS])"})
    data: str = field(default="", metadata={"help": f"a JSONL file or a packaged source {PACKAGED}"})
    val_data: str | None = field(default=None, metadata={"help": "a JSONL file (default: val_fraction of data)"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of data held out when val_data is unset"})
    max_examples: int | None = field(default=None, metadata={"help": "use at most this many training examples"})
    max_val_examples: int | None = field(default=None, metadata={
        "help": "use at most this many validation examples (each evaluation scores them all)"})
    max_len: int = field(default=256, metadata={"help": "tokens per example (longer ones are cut at the end)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    num_labels: int = field(default=2, metadata={"help": "classes for task=classify"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = field(default="q,k,v,o,gate,up,down", metadata={"help": "comma-separated, or 'all'"})
    qlora_bits: int = field(default=4, metadata={"help": "8 or 4: how the frozen base is stored for qlora"})
    prompt_tokens: int = field(default=20, metadata={"help": "virtual tokens for method=prompt"})
    out_dir: str = field(default="runs/finetune", metadata={"help": "metrics, checkpoints and report.json"})
    # fine-tuning defaults for the loop's fields
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    warmup_steps: int = 10
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay, applied to matrices only"})
    eval_every: int = field(default=50, metadata={"help": "steps between evaluations (0: only at the end)"})
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end)"})

    def validate(self) -> None:
        super().validate()
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}; expected one of {METHODS}")
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r}; expected one of {TASKS}")
        if not self.data:
            raise ConfigError(f"no data given; expected --data with a JSONL file or one of {PACKAGED}")
        if self.max_len < 2 or self.batch_size <= 0:
            raise ConfigError(f"max_len must be >= 2 and batch_size positive, got {self.max_len}, {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.task == "classify" and self.num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1 for task=classify, got {self.num_labels}")

    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets,
                          base_bits=self.qlora_bits if self.method == "qlora" else 0)


# ---- data ------------------------------------------------------------------------------------


def sft_items(source: str, tokenizer: Tokenizer) -> list[Example]:
    if source == "chitchat":
        return [conversation_to_example(c, tokenizer, f"chitchat[{i}]") for i, c in enumerate(chitchat_conversations())]
    if source == "movie_reviews":
        return [row_to_example(r, tokenizer) for r in sentiment_rows(movie_reviews())]
    return load_examples(source, tokenizer)


def classification_items(source: str, tokenizer: Tokenizer, num_labels: int,
                         frame: bool = False) -> list[tuple[list[int], int]]:
    """(ids, label) pairs: movie reviews as sentiment prompts, or JSONL rows {"text": ..., "label": int};
    `frame`: with the tokenizer's special tokens ([CLS] ... [SEP] for an encoder, whose classifier reads [CLS])."""
    if source == "movie_reviews":
        return [(tokenizer.encode(sentiment_prompt(r.text), frame), r.label) for r in movie_reviews()]
    return [(tokenizer.encode(r.text, frame), r.label) for r in read_labelled(source, num_labels)]


def load_items(config: FinetuneConfig, tokenizer: Tokenizer, source: str, encoder: bool = False) -> list:
    if source not in PACKAGED and not Path(source).is_file():
        raise DataError(f"data {source!r} is neither a file nor a packaged source {PACKAGED}")
    if config.task == "classify":
        return [(ids[:config.max_len], label) for ids, label in classification_items(source, tokenizer,
                                                                                     config.num_labels, encoder)]
    items = [truncate(e, config.max_len) for e in sft_items(source, tokenizer)]
    return [e for e in items if any(e.scored[1:])]  # a cut that leaves nothing to learn is dropped


def split_items(config: FinetuneConfig, tokenizer: Tokenizer, encoder: bool = False) -> tuple[list, list]:
    items = load_items(config, tokenizer, config.data, encoder)
    if config.val_data:
        items, _ = hold_out(items, n_val=0, seed=0)  # shuffled, all for training
        val = load_items(config, tokenizer, config.val_data, encoder)
    else:
        items, val = hold_out(items, config.val_fraction, seed=0)
    if config.max_examples is not None:
        items = items[:config.max_examples]
    if config.max_val_examples is not None:
        val = val[:config.max_val_examples]
    if len(val) > len(items):
        warn(f"{config.data}: {len(val)} validation examples but {len(items)} training ones; each evaluation "
             "then costs more than the training between them (lower val_fraction or max_val_examples)")
    if not items or not val:
        raise DataError(f"{config.data}: {len(items)} training and {len(val)} validation examples; expected some of each")
    return items, val


# ---- model -----------------------------------------------------------------------------------


def add_classification_head(model: Transformer, num_labels: int, seed: int = 0) -> Transformer:
    """The same model with a fresh `score` head (N(0, init_std)), as transformers adds one. An encoder's
    head is BertForSequenceClassification's: the pooler (kept if the checkpoint has one) and a biased
    classifier; its MLM head is dropped."""
    if model.config.num_labels == num_labels:
        return model
    config = model.config.replace(num_labels=num_labels, pooler=model.config.pooler or not model.config.causal)
    tensors = {k: v for k, v in model.state_dict().items()
               if not k.startswith(("score.", "mlm_")) and k != "lm_head.bias"}
    if not config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed)
    tensors["score.weight"] = torch.randn(num_labels, config.d_model, generator=g) * config.init_std
    if config.pooler:
        tensors["score.bias"] = torch.zeros(num_labels)
        if "pooler.weight" not in tensors:
            tensors["pooler.weight"] = torch.randn(config.d_model, config.d_model, generator=g) * config.init_std
            tensors["pooler.bias"] = torch.zeros(config.d_model)
    return Transformer.from_state_dict(config, tensors, dtype=model.dtype)


def base_name(spec: str) -> str:
    """How an adapter records its base: a local folder or file as an absolute path (so it loads from any
    working directory), a registry name as it is."""
    path = newest(spec)  # a run: the checkpoint it trained from
    return str(path.resolve()) if path.exists() else spec


def prepare_model(config: FinetuneConfig, model: Transformer):
    """(model to train, save_weights, load_weights) for the method; save/load None means HF folders."""
    if config.method == "full":
        return model, None, None
    if config.method == "prompt":
        tuned = PromptTuning(model, config.prompt_tokens, seed=config.seed)

        def save_prompt(folder, state):
            save_prompt_state(folder, state["prompt"], model.config, state.get("model.score.weight"))

        def load_prompt(folder):
            saved = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
            state = {**tuned.state_dict(), "prompt": saved["prompt_embeddings"]}
            if "base_model.model.score.weight" in saved:
                state["model.score.weight"] = saved["base_model.model.score.weight"]
            return state

        return tuned, save_prompt, load_prompt
    lora = config.lora()
    apply_lora(model, lora)
    lora = model.lora_config

    base = base_name(config.model)

    def save(folder, state):
        save_adapter_state(folder, state, lora, model.config, base)

    def load_(folder):
        return {**model.state_dict(), **read_adapter(folder, model.config)[1]}

    return model, save, load_


@torch.no_grad()
def mean_loss(model: nn.Module, objective, batches) -> float:
    """The objective's mean over batches, in eval mode (the loop's evaluation, before any step)."""
    was_training = model.training
    model.eval()
    losses = [float(objective(model, b)[0]) for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def classification_accuracy(model: nn.Module, batches) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for b in batches:
        logits = model.classify(b["input_ids"].to(device), b["attention_mask"].to(device))
        correct += int((logits.argmax(-1).cpu() == b["labels"]).sum())
        total += len(b["labels"])
    model.train(was_training)
    return correct / total


def run(config: FinetuneConfig) -> TrainResult:
    config.validate()
    if config.method in ("lora", "qlora"):
        config.lora()  # bad LoRA settings fail before the model is loaded
    if parallel.active(config) and (config.method != "full" or config.pp > 1):
        raise ConfigError(f"parallelism sizes with finetune need method=full and pp=1 (got method={config.method}, "
                          f"pp={config.pp}): the plans split the model's own linear layers, and the pipeline runs "
                          "unpadded (input, target) batches; use tp / dp_shard")
    started = time.perf_counter()
    with phase(f"load {config.model}", config.progress):
        model, tokenizer = load(config.model, dtype=torch.float32)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad is None:
        raise ConfigError(f"the tokenizer of {config.model} has neither a pad nor an EOS token to pad batches with")
    check_objective(model.config, config.task)
    with phase(f"read and tokenize {config.data}", config.progress):
        train_items, val_items = split_items(config, tokenizer, encoder=not model.config.causal)
    if config.task == "classify":
        model = add_classification_head(model, config.num_labels, config.seed)

        def collate(items):
            return collate_classification(items, pad)
    else:
        def collate(items):
            return collate_sft(items, pad)
    total_params = model.num_parameters()
    torch.manual_seed(config.seed)
    trained, save_weights, load_weights = prepare_model(config, model)
    data = BatchLoader(train_items, config.batch_size, collate, seed=config.seed)
    val_batches = in_order(val_items, config.batch_size, collate)
    val_loss_before = mean_loss(trained, OBJECTIVES[config.task],
                                bar(val_batches, "validation before training", config.progress))
    load_peak, rss_before = peak_rss_mb(), rss_mb()
    reset_peak_rss()  # the training peak, not that of reading (and dequantizing) the checkpoint
    result = train(trained, OBJECTIVES[config.task], data, config, config.out_dir, model_config=model.config,
                   eval_batches=lambda: val_batches, write_extra=tokenizer.save_pretrained,
                   run_config=dataclasses.asdict(config), save_weights=save_weights, load_weights=load_weights)
    report = {
        "command": "finetune", "config": dataclasses.asdict(config),
        "model": config.model, "method": config.method, "task": config.task, "data": config.data,
        "train_examples": len(train_items), "val_examples": len(val_items), **run_summary(result),
        "trainable_parameters": trainable_parameters(trained), "total_parameters": total_params,
        "val_loss_before": val_loss_before,
        "val_loss": next((r["val_loss"] for r in reversed(result.history) if "val_loss" in r), None),
        "wall_s": round(time.perf_counter() - started, 1), "train_peak_rss_mb": round(peak_rss_mb(), 1),
        "load_peak_rss_mb": round(load_peak, 1), "rss_at_train_start_mb": rss_before,
    }
    if config.task == "classify":
        report["val_accuracy"] = classification_accuracy(trained, bar(val_batches, "validation accuracy",
                                                                      config.progress))
    write_report(config.out_dir, f"Fine-tuning ({config.task}, {config.method})", report, [
        f"- model: `{config.model}`, data: `{config.data}` ({len(train_items)} train / {len(val_items)} validation "
        f"examples), seed {config.seed}",
        f"- trainable parameters: {report['trainable_parameters']:,} of {total_params:,}; validation loss "
        f"{val_loss_before:.4f} -> {report['val_loss']}; wall {report['wall_s']} s, training peak RSS "
        f"{report['train_peak_rss_mb']} MiB"])
    return dataclasses.replace(result, report=report)
