"""An adapter folder wherever a model is accepted: the base it records, loaded, with the adapter merged.

A LoRA adapter (peft's `adapter_config.json` + `adapter_model.safetensors`, as `llmkit finetune`
writes into every checkpoint) names its base in `base_model_name_or_path`, as peft records it. Loading
one loads that base and folds W0 + (alpha/r) B A into it, so generation, evaluation and serving run a
plain model at the base's speed, with the logits of the merged checkpoint `llmkit merge-lora` writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmkit.errors import FormatError
from llmkit.files import read_json
from llmkit.formats.runs import newest
from llmkit.model import Transformer
from llmkit.model import load as load_model
from llmkit.peft.lora import ADAPTER_CONFIG, load_adapter, merge_lora
from llmkit.tokenizer import Tokenizer


def is_adapter(spec: str | os.PathLike) -> bool:
    """Whether `spec` is an adapter folder (peft's adapter_config.json, no model config.json), or the
    run folder of a LoRA fine-tuning (its newest checkpoint is one)."""
    folder = newest(spec)
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def recorded_base(spec: str | os.PathLike) -> str:
    """The base model an adapter folder names (base_model_name_or_path: a folder, .gguf file or name)."""
    meta = read_json(Path(spec) / ADAPTER_CONFIG, "peft's adapter config as a JSON object")
    base = meta.get("base_model_name_or_path") if isinstance(meta, dict) else None
    if not isinstance(base, str) or not base:
        raise FormatError(f"{spec}: the adapter records no base model (base_model_name_or_path is "
                          f"{base!r}); merge it with `llmkit merge-lora BASE --adapter {spec} --out FOLDER` and "
                          "use that folder")
    if isinstance(meta, dict) and meta.get("peft_type") != "LORA":
        raise FormatError(f"{spec}: a {meta.get('peft_type')} adapter; only LoRA adapters load as a model "
                          "(prompt tuning needs its virtual tokens: llmkit.peft.prompt_tuning)")
    return base


def load(spec: str | os.PathLike, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> tuple[Transformer, Tokenizer | None]:
    """`llmkit.model.load`, and for an adapter folder its recorded base with the adapter merged (in fp32,
    then cast to `dtype`, or to the base's own), with the adapter folder's tokenizer when it has one."""
    if not is_adapter(spec):
        return load_model(spec, dtype=dtype, device=device)
    spec = newest(spec)
    model, tokenizer = load_model(recorded_base(spec))
    merge_into(model, spec)
    if (Path(spec) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(spec)
    return model.to(device=device, dtype=dtype or model.dtype), tokenizer


def merge_into(model: Transformer, adapter: str | os.PathLike) -> Transformer:
    """Fold a LoRA adapter (or a LoRA run's newest checkpoint) into `model`, in place: W0 + (alpha/r) B A
    computed in fp32, the model left in its dtype."""
    dtype = model.dtype
    merge_lora(load_adapter(model.float(), newest(adapter)))
    return model.to(dtype)


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """`llmkit merge-lora`: a base model (folder, GGUF or registry name) + an adapter (or a LoRA run's
    folder) -> a merged HF checkpoint with the base's tokenizer."""
    model, tokenizer = load_model(base, dtype=torch.float32)
    merge_into(model, adapter)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return Path(out)
