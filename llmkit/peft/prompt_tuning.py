"""Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings prepended to every input.

    tuned = PromptTuning(model, num_virtual_tokens=20)     # the model is frozen; only `tuned.prompt` trains
    logits = tuned(input_ids, attention_mask)                # (batch, seq, vocab): the real positions only
    scores = tuned.classify(input_ids, attention_mask)       # with a classification head
    save_prompt(tuned, "runs/prompt")                        # peft's PROMPT_TUNING adapter folder
    tuned = load_prompt(model, "runs/prompt")

The virtual tokens take n placeholder positions at the start of each row (positions 0..n-1, always
attended); a hook on the embedding swaps the placeholders' embeddings for the trainable ones, so the
model itself is unchanged. peft's files (`prompt_embeddings` in adapter_model.safetensors) load with
`peft.PeftModel.from_pretrained` on the transformers model of our checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from llmkit.errors import ConfigError, FormatError
from llmkit.files import atomic_path, atomic_write_json, read_json
from llmkit.formats.hf import read_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PromptTuning(nn.Module):
    def __init__(self, model: nn.Module, num_virtual_tokens: int = 20, seed: int = 0):
        super().__init__()
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        self.model = model
        self.config = model.config
        for p in model.parameters():
            p.requires_grad_(False)
        # Start from the embeddings of random vocabulary tokens: on the scale the model expects.
        g = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, model.config.vocab_size, (num_virtual_tokens,), generator=g)
        self.prompt = nn.Parameter(model.embed.weight.detach()[picks.to(model.embed.weight.device)].clone().float())
        self._active = False
        model.embed.register_forward_hook(self._swap_in)
        if getattr(model, "score", None) is not None:
            model.score.weight.requires_grad_(True)  # a classifier's head trains with the prompt

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def _swap_in(self, module, inputs, output):
        if not self._active:
            return output
        n = self.num_virtual_tokens
        return torch.cat([self.prompt.to(output.dtype).expand(output.shape[0], -1, -1), output[:, n:]], 1)

    @contextlib.contextmanager
    def _prompted(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def _extend(self, input_ids, attention_mask):
        b, n = input_ids.shape[0], self.num_virtual_tokens
        ids = torch.cat([input_ids.new_zeros(b, n), input_ids], 1)
        if attention_mask is None:
            return ids, None
        return ids, torch.cat([attention_mask.new_ones(b, n), attention_mask], 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = self._extend(input_ids, attention_mask)
        with self._prompted():
            return self.model(ids, attention_mask=mask)[:, self.num_virtual_tokens:]

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids, mask = self._extend(input_ids, attention_mask)
        with self._prompted():
            return self.model.classify(ids, mask)


def save_prompt_state(folder: str | Path, prompt: torch.Tensor, model_config,
                      head: torch.Tensor | None = None) -> Path:
    """peft's PROMPT_TUNING adapter folder for a prompt (n, d) and a classifier's trained head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt_embeddings": prompt}
    if head is not None:
        tensors["base_model.model.score.weight"] = head
    with atomic_path(folder / ADAPTER_WEIGHTS) as p:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(p),
                  metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_CLS" if model_config.num_labels else "CAUSAL_LM",
        "num_virtual_tokens": prompt.shape[0], "token_dim": model_config.d_model, "num_transformer_submodules": 1,
        "num_attention_heads": model_config.n_head, "num_layers": model_config.n_layer,
        "prompt_tuning_init": "RANDOM", "inference_mode": True, "base_model_name_or_path": None,
        "modules_to_save": ["score"] if model_config.num_labels else None,
    })
    return folder


def save_prompt(tuned: PromptTuning, folder: str | Path) -> Path:
    head = tuned.model.score.weight if getattr(tuned.model, "score", None) is not None else None
    return save_prompt_state(folder, tuned.prompt, tuned.config, head)


def load_prompt(model: nn.Module, folder: str | Path) -> PromptTuning:
    folder = Path(folder)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    meta = read_json(config_file, "peft's PromptTuningConfig as a JSON object")
    if not isinstance(meta, dict) or meta.get("peft_type") != "PROMPT_TUNING":
        raise FormatError(f"{config_file}: peft_type={meta.get('peft_type') if isinstance(meta, dict) else meta!r}; "
                          "expected a JSON object with peft_type PROMPT_TUNING")
    tensors = read_safetensors(weights_file, "a prompt-tuning adapter's prompt_embeddings")
    prompt = tensors.get("prompt_embeddings")
    head = tensors.get("base_model.model.score.weight")
    score = getattr(model, "score", None)
    if prompt is None or prompt.dim() != 2 or prompt.shape[1] != model.config.d_model or prompt.shape[0] == 0 \
            or (head is not None and score is not None and head.shape != score.weight.shape):
        raise FormatError(f"{weights_file}: tensors {({k: tuple(v.shape) for k, v in tensors.items()})}; expected "
                          f"prompt_embeddings of shape (n, {model.config.d_model}) and an optional "
                          "base_model.model.score.weight of the model's head shape")
    tuned = PromptTuning(model, prompt.shape[0])
    with torch.no_grad():
        tuned.prompt.copy_(prompt)
        if "base_model.model.score.weight" in tensors and getattr(model, "score", None) is not None:
            model.score.weight.copy_(tensors["base_model.model.score.weight"])
    return tuned
