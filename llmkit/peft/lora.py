"""LoRA (Hu et al. 2021): W = W0 + (alpha / r) * B A on chosen linear layers, W0 frozen.

    model = llmkit.Transformer.from_pretrained(...)
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, targets=("q", "v")))  # in place
    ... train: only lora_A / lora_B (and a classification head `score`) require grad ...
    save_adapter(model, "runs/adapter")      # adapter_config.json + adapter_model.safetensors (peft's format)
    load_adapter(base_model, "runs/adapter") # LoRA applied with the saved r, alpha, targets, then loaded
    merge_lora(model)                        # fold B A into W0 and drop the adapters: a plain Transformer

`targets` are short names: q, k, v, o (attention), gate, up, down (MLP), or "all". `base_bits` 8 or
4 stores every frozen block linear quantized (QLoRA, `llmkit.peft.qlora`). Each adapted layer is a
`LoraLinear` whose `merge()` / `unmerge()` fold the update in and out in place (float bases only).

The files are peft's: tensors named `base_model.model.<transformers module>.lora_A.weight`
(`lora_B`), `adapter_config.json` with peft's fields, and a classifier's head saved under
`modules_to_save` (`base_model.model.score.weight`), so `peft.PeftModel.from_pretrained` loads them
onto the transformers model of our saved checkpoint. GPT-2 fuses q, k, v into `c_attn`: there the
three adapters are saved as one of rank 3r (A stacked, B block-diagonal, alpha 3·alpha), which is
the same update, and split again on load.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, FormatError
from llmkit.files import atomic_path, atomic_write_json, read_json
from llmkit.formats.hf import read_safetensors, tensor_map

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator: the update is (alpha / r) B A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path's input"})
    targets: tuple[str, ...] = field(default=("q", "v"), metadata={"help": f"modules to adapt: {TARGETS} or 'all'"})
    base_bits: int = field(default=0, metadata={"help": "0: frozen base in full precision; 8 or 4: QLoRA"})

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(t.removesuffix("_proj") for t in self.targets)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS and self.targets != ("all",)]
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets {list(self.targets)}: unknown {unknown}; expected names from {TARGETS} "
                              "or 'all'")
        if self.base_bits not in (0, 4, 8):
            raise ConfigError(f"base_bits={self.base_bits}; expected 0 (full precision), 8 or 4")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoraLinear(nn.Module):
    """base(x) + (alpha / r) · B(A(dropout(x))), with `base` frozen and B initialised to zero."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        weight = base.weight if hasattr(base, "weight") else None
        device = weight.device if weight is not None else None
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        lora = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + lora * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):
            raise ConfigError(f"cannot merge LoRA into a quantized base ({type(self.base).__name__}); "
                              "use merge_lora(model), which dequantizes it")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# ---- inject, merge ---------------------------------------------------------------------------


def _target_of(module_path: str) -> str | None:
    """`blocks.3.attn.q_proj` -> "q"; None for anything that is not a block linear."""
    last = module_path.rsplit(".", 1)[-1]
    return last.removesuffix("_proj") if module_path.startswith("blocks.") and last.endswith("_proj") else None


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze `model` and wrap each targeted linear in a `LoraLinear` (in place); a classification head
    (`score`) stays trainable. With `config.base_bits`, every block linear is stored quantized first."""
    if getattr(model, "lora_config", None) is not None:
        raise ConfigError("the model already has LoRA adapters; merge_lora() it first or load a fresh model")
    linears = {name: m for name, m in model.named_modules() if _target_of(name) and isinstance(m, nn.Linear)}
    present = {_target_of(name) for name in linears}
    if config.targets == ("all",):  # every adaptable linear this architecture has
        config = dataclasses.replace(config, targets=tuple(t for t in TARGETS if t in present))
    missing = [t for t in config.targets if t not in present]
    if missing:
        raise ConfigError(f"LoRA target(s) {missing} match no module of this model; it has "
                          f"{[t for t in TARGETS if t in present]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if config.base_bits:
        from llmkit.peft.qlora import QuantizedLinear

        for name, linear in linears.items():
            _set_module(model, name, QuantizedLinear(linear, config.base_bits))
    for name in linears:
        if _target_of(name) in config.targets:
            layer = LoraLinear(model.get_submodule(name), config.r, config.alpha, config.dropout)
            _set_module(model, name, layer.train(model.training))  # an eval-mode model stays in eval mode
    if getattr(model, "score", None) is not None:
        model.score.weight.requires_grad_(True)
    model.lora_config = config
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `nn.Linear`s back (peft's merge_and_unload).
    A quantized base is dequantized to float32 first."""
    from llmkit.peft.qlora import QuantizedLinear

    for name, layer in lora_layers(model).items():
        if isinstance(layer.base, QuantizedLinear):
            layer.base = layer.base.dequantized()
        layer.merge()
        _set_module(model, name, layer.base)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            _set_module(model, name, m.dequantized())
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora_config = None
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- peft's file format ----------------------------------------------------------------------


def _hf_modules(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """Our module -> (transformers module, slot): slot 0/1/2 is q/k/v inside GPT-2's fused c_attn."""
    out = {}
    for e in tensor_map(config):
        if e.hf.endswith(".weight"):
            for i, ours in enumerate(e.ours):
                if _target_of(ours.removesuffix(".weight")):
                    out[ours.removesuffix(".weight")] = (e.hf.removesuffix(".weight"), i if e.kind == "qkv" else None)
    return out


def _short_name(hf_module: str, all_modules: list[str]) -> str:
    """The shortest dotted suffix naming only modules of this kind: q_proj, but attn.c_proj vs mlp.c_proj."""
    def kind(m: str) -> str:
        return re.sub(r"\.\d+\.", ".N.", m)

    parts = hf_module.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if {kind(m) for m in all_modules if m == suffix or m.endswith("." + suffix)} == {kind(hf_module)}:
            return suffix
    return hf_module


def adapter_tensors(state: dict[str, torch.Tensor], model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """peft-named adapter (and head) tensors from a LoRA model's state dict in our names."""
    mapping = _hf_modules(model_config)
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, a in state.items():
        if not key.endswith(".lora_A"):
            continue
        module = key.removesuffix(".lora_A")
        b = state[module + ".lora_B"]
        hf_module, slot = mapping[module]
        if slot is None:
            out[f"{_PREFIX}{hf_module}.lora_A.weight"] = a
            out[f"{_PREFIX}{hf_module}.lora_B.weight"] = b
        else:
            fused.setdefault(hf_module, {})[slot] = (a, b)
    for hf_module, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise ConfigError(f"{hf_module} fuses q, k and v: GPT-2 adapters must target all three or none, "
                              f"got {[('q', 'k', 'v')[s] for s in sorted(parts)]}")
        out[f"{_PREFIX}{hf_module}.lora_A.weight"] = torch.cat([parts[s][0] for s in range(3)])
        out[f"{_PREFIX}{hf_module}.lora_B.weight"] = torch.block_diag(*(parts[s][1] for s in range(3)))
    if "score.weight" in state:
        out[f"{_PREFIX}score.weight"] = state["score.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def adapter_config(config: LoraConfig, model_config: ModelConfig, base: str | None = None) -> dict:
    """adapter_config.json as peft writes it (the fields peft reads to rebuild the LoRA model); `base`
    is the model it adapts (base_model_name_or_path), which loading the folder as a model reads."""
    mapping = _hf_modules(model_config)
    all_hf = sorted({hf for hf, _ in mapping.values()})
    targets = sorted({_short_name(hf, all_hf) for ours, (hf, _) in mapping.items() if _target_of(ours) in config.targets})
    fused = sorted({_short_name(hf, all_hf) for ours, (hf, slot) in mapping.items()
                    if slot is not None and _target_of(ours) in config.targets})
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if model_config.num_labels else "CAUSAL_LM",
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": targets,
        "rank_pattern": {name: 3 * config.r for name in fused},
        "alpha_pattern": {name: 3 * config.alpha for name in fused},
        "fan_in_fan_out": model_config.hf_model_type == "gpt2",  # Conv1D stores [in, out]
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": ["score"] if model_config.num_labels else None,
        "base_model_name_or_path": base, "revision": None, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
    }


def save_adapter_state(folder: str | Path, state: dict[str, torch.Tensor], config: LoraConfig,
                       model_config: ModelConfig, base: str | None = None) -> Path:
    """Write a LoRA model's state dict (our names) as a peft adapter folder, atomically per file;
    `base` names the base model (a folder, .gguf file or registry name) the adapter applies to."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(state, model_config)
    with atomic_path(folder / ADAPTER_WEIGHTS) as p:
        save_file(tensors, str(p), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, adapter_config(config, model_config, base))
    return folder


def save_adapter(model: nn.Module, folder: str | Path, base: str | None = None) -> Path:
    """Write `model`'s adapters (and head) as a peft adapter folder (lora_A/B hold the update merged or not);
    `base` is recorded as the model the adapter applies to."""
    return save_adapter_state(folder, model.state_dict(), _require_lora(model), model.config, base)


def _require_lora(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ConfigError("the model has no LoRA adapters; call apply_lora(model, LoraConfig(...)) first")
    return config


def read_adapter(folder: str | Path, model_config: ModelConfig) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, tensors in our names) of a peft LoRA adapter folder for a model of `model_config`."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FormatError(f"{folder} is not a LoRA adapter folder: {name} is missing")
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    meta = read_json(config_file, "peft's LoraConfig as a JSON object")
    if not (isinstance(meta, dict) and type(meta.get("r")) is int and type(meta.get("lora_alpha")) in (int, float)):
        raise FormatError(f"{config_file}: expected a JSON object with peft's LoraConfig fields, among them an "
                          f"integer 'r' and a number 'lora_alpha'; got {str(meta)[:100]}")
    tensors = read_safetensors(weights_file, "LoRA adapter weights")
    if meta.get("peft_type") != "LORA" or meta.get("use_dora") or meta.get("use_rslora"):
        raise FormatError(f"{config_file}: peft_type={meta.get('peft_type')!r}, use_dora={meta.get('use_dora')}, "
                          f"use_rslora={meta.get('use_rslora')}; expected plain LoRA")
    _check_peft_fields(meta, folder, model_config)
    by_hf: dict[str, list[tuple[str, int | None]]] = {}
    for ours, (hf_module, slot) in _hf_modules(model_config).items():
        by_hf.setdefault(hf_module, []).append((ours, slot))
    r, alpha = int(meta["r"]), float(meta["lora_alpha"])
    ours_tensors: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key == f"{_PREFIX}score.weight":
            ours_tensors["score.weight"] = t
            continue
        module, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or module not in by_hf:
            raise FormatError(f"{weights_file}: tensor {key} names no adaptable module of this "
                              f"{model_config.hf_model_type} model")
        for ours, slot in by_hf[module]:
            if slot is None:
                ours_tensors[f"{ours}.lora_{kind[0]}"] = t
            elif kind == "A.weight":
                ours_tensors[f"{ours}.lora_A"] = t.chunk(3)[slot]
            else:
                rows, cols = t.shape[0] // 3, t.shape[1] // 3
                slab = t[slot * rows:(slot + 1) * rows].clone()
                block = slab[:, slot * cols:(slot + 1) * cols].clone()
                slab[:, slot * cols:(slot + 1) * cols] = 0
                if slab.any():
                    raise FormatError(f"{weights_file}: {key} is not block-diagonal over q, k, v; a LoRA on GPT-2's fused "
                                      "c_attn that mixes them cannot be split into llmkit's q/k/v adapters")
                ours_tensors[f"{ours}.lora_B"] = block
    targets = tuple(sorted({_target_of(k.rsplit(".", 1)[0]) for k in ours_tensors if k != "score.weight"},
                           key=TARGETS.index))
    if not targets:
        raise FormatError(f"{weights_file}: the adapter holds no LoRA tensors")
    r, alpha = _fold_patterns(ours_tensors, meta, r, alpha, _hf_modules(model_config))
    config = LoraConfig(r=r, alpha=alpha, dropout=float(meta.get("lora_dropout", 0.0)), targets=targets)
    return config, ours_tensors


# peft LoraConfig fields (0.21) llmkit honours whatever their value: bookkeeping, what the tensors
# themselves say (which modules and layers are adapted), initialisation (the weights are loaded), and
# the per-module rank_pattern / alpha_pattern (_fold_patterns).
_PEFT_HONOURED = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                  "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                  "layers_to_transform", "layers_pattern", "init_lora_weights", "rank_pattern", "alpha_pattern",
                  "megatron_core", "qalora_group_size", "runtime_config", "use_dora", "use_rslora",
                  "fan_in_fan_out", "modules_to_save", "bias", "ensure_weight_tying"}
# Fields that change what the adapter computes or the base it applies to: refused unless at peft's default.
_PEFT_DEFAULTS = {"megatron_config": None, "trainable_token_indices": None, "loftq_config": {}, "eva_config": None,
                  "corda_config": None, "lora_ga_config": None, "velora_config": None,
                  "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
                  "layer_replication": None, "lora_bias": False, "target_parameters": None, "use_bdlora": None,
                  "arrow_config": None, "kasa_config": None}


def _check_peft_fields(meta: dict, folder: Path, model_config: ModelConfig) -> None:
    """Every field of adapter_config.json is honoured or refused by name (nothing loads silently wrong)."""
    unknown = sorted(set(meta) - _PEFT_HONOURED - set(_PEFT_DEFAULTS))
    if unknown:
        raise FormatError(f"{folder}: adapter_config.json has field(s) {unknown} that llmkit does not know; "
                          "expected peft's LoraConfig fields (peft 0.21)")
    changed = sorted(k for k, default in _PEFT_DEFAULTS.items() if k in meta and meta[k] not in (default, None))
    if changed:
        raise FormatError(f"{folder}: adapter_config.json sets {', '.join(f'{k}={meta[k]!r}' for k in changed)}; "
                          "llmkit loads plain LoRA only (these fields must be at peft's defaults)")
    if meta.get("bias", "none") != "none":
        raise FormatError(f"{folder}: bias={meta['bias']!r}: the adapter trains biases; llmkit's LoRA expects 'none'")
    saved = set(meta.get("modules_to_save") or ()) - {"score", "classifier"}
    if saved:
        raise FormatError(f"{folder}: modules_to_save={sorted(saved)}; llmkit keeps only a classifier head ('score')")
    fan_in_fan_out = model_config.hf_model_type == "gpt2"
    if "fan_in_fan_out" in meta and bool(meta["fan_in_fan_out"]) != fan_in_fan_out:
        raise FormatError(f"{folder}: fan_in_fan_out={meta['fan_in_fan_out']} but a "
                          f"{model_config.hf_model_type} model needs {fan_in_fan_out}")


def _pattern(pattern: dict | None, hf_module: str, default: float) -> float:
    """peft's rule: the first key that matches the end of the module's name (a name or a regex)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", hf_module):
            return value
    return default


def _fold_patterns(tensors: dict[str, torch.Tensor], meta: dict, r: int, alpha: float,
                   modules: dict[str, tuple[str, int | None]]) -> tuple[int, float]:
    """Per-module ranks and alphas (peft's rank_pattern / alpha_pattern) as one (r, alpha): each
    module's B is multiplied by its scaling over the common one, and A and B are zero-padded to the
    largest rank. B·A and so every output are unchanged; the padding stays zero when training on."""
    ranks = {k.removesuffix(".lora_A"): t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")}
    if not ranks:
        return r, alpha
    common_r = max(ranks.values())
    common_scaling = alpha / r
    for ours, rank in ranks.items():
        hf_module, slot = modules[ours]
        module_r = _pattern(meta.get("rank_pattern"), hf_module, r)
        module_alpha = _pattern(meta.get("alpha_pattern"), hf_module, alpha)
        expected = module_r if slot is None else module_r // 3
        if rank != expected:
            raise FormatError(f"adapter tensor {hf_module}.lora_A has rank {rank}; its adapter_config.json says "
                              f"{expected} (r={r}, rank_pattern={meta.get('rank_pattern')})")
        a, b = tensors[f"{ours}.lora_A"], tensors[f"{ours}.lora_B"] * ((module_alpha / module_r) / common_scaling)
        tensors[f"{ours}.lora_A"] = torch.cat([a, a.new_zeros(common_r - rank, a.shape[1])])
        tensors[f"{ours}.lora_B"] = torch.cat([b, b.new_zeros(b.shape[0], common_r - rank)], dim=1)
    return common_r, common_scaling * common_r


def load_adapter(model: nn.Module, folder: str | Path, base_bits: int = 0) -> nn.Module:
    """Apply the adapter saved in `folder` to a base `model` (in place) and load its weights;
    `base_bits` 8 or 4 quantizes the base first (QLoRA)."""
    config, tensors = read_adapter(folder, model.config)
    config.base_bits = base_bits
    apply_lora(model, config)
    state = model.state_dict()
    for key, t in tensors.items():
        if key not in state or state[key].shape != t.shape:
            raise FormatError(f"{folder}: tensor for {key} has shape {tuple(t.shape)}; the model expects "
                              f"{tuple(state[key].shape) if key in state else 'no such tensor'}")
    model.load_state_dict(tensors, strict=False)
    return model
