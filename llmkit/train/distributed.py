"""The same loop on many processes: torchrun sets RANK/WORLD_SIZE, we pick the backend and wrap.

- backend: gloo on CPU, nccl on CUDA.
- strategy "ddp": DistributedDataParallel (every rank holds the whole model, gradients averaged).
- strategy "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`): each block, then the root, is
  sharded across ranks; parameters are gathered for compute and gradients reduce-scattered.
Checkpoints gather full (unsharded) state dicts through `torch.distributed.checkpoint.state_dict`,
so a checkpoint written by 2 FSDP ranks is an ordinary HF folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmkit.errors import ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: torch.device) -> World:
    """Join the process group that torchrun describes in the environment (or stay single)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
    return world


def wrap(model: nn.Module, strategy: str, world: World, device: torch.device) -> nn.Module:
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed={strategy!r}; expected one of {STRATEGIES}")
    if not world.distributed or strategy == "none":
        return model
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside DDP / torch.compile wrappers (FSDP2 shards in place: no wrapper)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters keyed like the plain model (collective under FSDP: call on every rank)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state, optimizer_state) -> None:
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unwrap(model), model_state, options=options)
    set_optimizer_state_dict(unwrap(model), optimizer, optimizer_state, options=options)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def max_over_ranks(values: list[float], world: World) -> list[float]:
    """Each value's maximum over the ranks, so every rank takes the same decision from them."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def any_rank(flag: bool, world: World) -> bool:
    """True if `flag` is set on any rank, so every rank stops (or saves) together."""
    return max_over_ranks([float(flag)], world)[0] > 0


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
