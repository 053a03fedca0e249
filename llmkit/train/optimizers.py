"""The loop's optimizers, and the one place that decides which parameter each one updates.

- **AdamW** (the default): decay on matrices only, never on norms' gains or biases.
- **Muon** (`torch.optim.Muon`: momentum orthogonalised by a Newton–Schulz iteration, as in
  modded-nanogpt and nanochat) on the blocks' hidden matrices; AdamW keeps the token embedding, the LM
  head, norms, biases and anything that is not a 2-D matrix (stacked experts), as those speedruns do.
  The two run as one `torch.optim.Optimizer`, so the loop, its checkpoints and FSDP2's state-dict
  helpers see a single object with one state dict.

Every group records its peak learning rate as `initial_lr` (the key torch's schedulers use); the loop
sets `lr = initial_lr x schedule factor`, so Muon and AdamW follow one schedule at their own peaks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from llmkit.errors import ConfigError

OPTIMIZERS = ("adamw", "muon")


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block: what Muon updates (not embeddings, heads or norms)."""
    return param.dim() == 2 and "blocks." in name


def param_groups(model: nn.Module, weight_decay: float, muon: bool = False) -> list[dict[str, Any]]:
    """Weight decay on matrices (dim >= 2) only. With `muon`, the blocks' matrices form their own groups
    (`"algorithm": "muon"`). Under tensor parallel, one group per device mesh too (a fused step runs on
    tensors of one kind: plain, or DTensors of one mesh)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    meshes = list(dict.fromkeys(getattr(p, "device_mesh", None) for _, p in named))

    def kind(name: str, p: torch.Tensor) -> tuple[str, bool]:
        if muon and is_hidden_matrix(name, p):
            return "muon", True
        return "adamw", p.dim() >= 2

    groups = []
    for algorithm, decay in (("muon", True), ("adamw", True), ("adamw", False)):
        for mesh in meshes:
            params = [p for n, p in named if kind(n, p) == (algorithm, decay)
                      and getattr(p, "device_mesh", None) == mesh]
            # AdamW alone keeps its two groups on one mesh, as before (DCP's loader takes one empty group at most)
            if params or (algorithm == "adamw" and not muon and len(meshes) == 1):
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "algorithm": algorithm})
    return groups


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with decay on matrices only, fused (one kernel for all tensors, 5x faster than the
    per-tensor loop on a 2-core CPU) where torch has the fused kernel."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                                  fused=_device(model).type in ("cpu", "cuda"))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", lr)
    return optimizer


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked `"algorithm": "muon"`, fused AdamW on the others: one optimizer whose
    groups and state are those of the two inside it (the same dicts), so `state_dict`, `load_state_dict`,
    `zero_grad` and torch.distributed's optimizer state-dict helpers work on it as on any optimizer."""

    def __init__(self, groups: list[dict[str, Any]], *, lr: float, muon_lr: float, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool = True):
        muon_groups = [g for g in groups if g["algorithm"] == "muon"]
        adam_groups = [g for g in groups if g["algorithm"] != "muon"]
        if not muon_groups:
            raise ConfigError("optimizer=muon: the model has no 2-D weights inside transformer blocks to give Muon")
        parts = [torch.optim.Muon(muon_groups, lr=muon_lr, momentum=momentum, nesterov=True)]
        if adam_groups:
            parts.append(torch.optim.AdamW(adam_groups, lr=lr, betas=betas, eps=eps, fused=fused))
        for part in parts:
            for group in part.param_groups:
                group.setdefault("initial_lr", group["lr"])
        super().__init__([g for part in parts for g in part.param_groups], defaults={})
        self._parts = parts
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (after `load_state_dict` replaced them).
        Sharded (DTensor) Muon groups stay out of torch's Muon: `_step_sharded` updates them."""
        for part, algorithm in zip(self._parts, ("muon", "adamw"), strict=False):
            part.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm
                                 and not (algorithm == "muon" and _sharded(g))]
            part.state = self.state
        self._sharded = [g for g in self.param_groups if g["algorithm"] == "muon" and _sharded(g)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self._parts:
            part.step()
        for group in self._sharded:
            self._step_sharded(group)
        return loss

    def _step_sharded(self, group: dict[str, Any]) -> None:
        """Muon on matrices sharded by FSDP2 or tensor parallel: Newton–Schulz needs the whole matrix, so
        each one's parameter, gradient and momentum are gathered, torch's Muon steps the whole matrix on
        every rank (the same numbers as one process), and each rank keeps its shard. (nanochat instead
        gives each rank whole matrices in turn; here the iteration is repeated on every rank.)"""
        from torch.distributed.tensor import distribute_tensor

        hyper = {k: group[k] for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                                       "ns_steps", "adjust_lr_fn")}
        for p in group["params"]:
            if p.grad is None:
                continue
            whole = nn.Parameter(p.full_tensor())
            whole.grad = p.grad.full_tensor()
            inner = torch.optim.Muon([whole], **hyper)
            state = self.state[p]
            if "momentum_buffer" in state:
                inner.state[whole]["momentum_buffer"] = state["momentum_buffer"].full_tensor()
            inner.step()
            p.copy_(distribute_tensor(whole.detach(), p.device_mesh, p.placements, src_data_rank=None))
            state["momentum_buffer"] = distribute_tensor(inner.state[whole]["momentum_buffer"], p.device_mesh,
                                                         p.placements, src_data_rank=None)


def build(model: nn.Module, name: str, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8, muon_lr: float = 0.02, muon_momentum: float = 0.95) -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over `model`'s trainable parameters."""
    if name == "adamw":
        return adamw(model, lr, weight_decay, betas, eps)
    if name == "muon":
        return MuonAdamW(param_groups(model, weight_decay, muon=True), lr=lr, muon_lr=muon_lr,
                         momentum=muon_momentum, betas=betas, eps=eps,
                         fused=_device(model).type in ("cpu", "cuda"))
    raise ConfigError(f"optimizer={name!r}; expected one of {OPTIMIZERS}")


def _sharded(group: dict[str, Any]) -> bool:
    return any(hasattr(p, "device_mesh") for p in group["params"])


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
