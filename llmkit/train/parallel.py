"""Parallelism beyond data parallel, composed on one DeviceMesh as torchtitan does, with PyTorch's own engine.

The sizes (`ParallelConfig`, fields of every training config and so flags of `pretrain`/`finetune`)
multiply to the world size and name the dimensions of one mesh, ("pp", "dp_replicate", "dp_shard", "ep", "tp"):

- tp: tensor parallel (`torch.distributed.tensor.parallel`): q/k/v and gate/up split by columns (whole
  heads and channels per rank), o/down by rows, one all-reduce per sublayer, the embedding and the LM head
  by vocabulary rows (the loss runs vocabulary-parallel: `llmkit.losses.linear_cross_entropy`);
  with `sp` the norms run sequence parallel (the residual stream sharded by position between sublayers:
  an all-gather before attention and the MLP and a reduce-scatter after, instead of the all-reduce).
- pp: pipeline parallel (`torch.distributed.pipelining`): the blocks split into `pp` contiguous stages,
  the first with the embedding, the last with the final norm and the LM head (its loss is cross-entropy
  of the micro-batch's logits); a 1F1B or GPipe schedule over `pp_microbatches` micro-batches.
- dp_shard / dp_replicate: FSDP2 (`fully_shard`) over dp_shard, HSDP when dp_replicate > 1 too; on top
  of TP it is 2D (each rank holds 1/(tp x dp_shard) of a block).
- ep: expert parallel: each MoE block's experts split over the ep ranks, which share the batch; each
  runs its experts on every token and one all-reduce sums their outputs (memory of the experts / ep).
- cp (context parallel) is refused: see docs/parallelism.md.

Everything is checked by `check` before any compute. Checkpoints stay HF folders: DTensors are gathered
to full tensors (`torch.distributed.checkpoint.state_dict`), pipeline stages' pieces collected on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError

SCHEDULES = ("1F1B", "GPipe")
DIMS = ("pp", "dp_replicate", "dp_shard", "ep", "tp")


@dataclass
class ParallelConfig:
    """The parallelism section of a training config: one size per mesh dimension (product = world size)."""

    dp_replicate: int = field(default=1, metadata={"help": "data-parallel replicas (HSDP's replicate dimension)"})
    dp_shard: int = field(default=-1, metadata={
        "help": "FSDP2 shards per replica (-1: the world size divided by the other sizes)"})
    tp: int = field(default=1, metadata={"help": "tensor-parallel ranks per layer (divides the heads and KV heads)"})
    sp: bool = field(default=False, metadata={"help": "sequence parallel norms over the tp ranks (needs tp > 1)"})
    pp: int = field(default=1, metadata={"help": "pipeline stages (contiguous blocks each)"})
    pp_schedule: str = field(default="1F1B", metadata={"help": f"pipeline schedule: one of {SCHEDULES}"})
    pp_microbatches: int = field(default=0, metadata={
        "help": "micro-batches each batch is cut into for the pipeline (0: 2 x pp)"})
    cp: int = field(default=1, metadata={"help": "context-parallel ranks (not built: must be 1)"})
    ep: int = field(default=1, metadata={"help": "expert-parallel ranks (divides the experts; they share the batch)"})


@dataclass(frozen=True)
class Layout:
    """The resolved sizes of one run: every dimension's size, and this rank's data-parallel slice."""

    pp: int
    dp_replicate: int
    dp_shard: int
    ep: int
    tp: int
    sp: bool
    microbatches: int
    schedule: str

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIMS)


def active(config: ParallelConfig) -> bool:
    """True when the sizes ask for more than plain data parallel (which `distributed.wrap` keeps doing)."""
    return (config.tp, config.pp, config.cp, config.ep, config.dp_replicate) != (1,) * 5 or config.dp_shard != -1 \
        or config.sp


def check(config: ParallelConfig, model: ModelConfig, world_size: int, batch_size: int | None = None,
          context: int | None = None) -> Layout:
    """The sizes resolved against the world and the model, or one ConfigError saying what is wrong."""
    sizes = {n: getattr(config, n) for n in ("dp_replicate", "tp", "pp", "cp", "ep")}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallelism: {name} must be a positive integer, got {value!r}")
    if config.dp_shard != -1 and (not isinstance(config.dp_shard, int) or config.dp_shard < 1):
        raise ConfigError(f"parallelism: dp_shard must be a positive integer or -1 (the rest), got {config.dp_shard!r}")
    if config.cp > 1:
        raise ConfigError(f"parallelism: cp={config.cp}; context parallel is not built in llmkit (PyTorch's "
                          "context_parallel replaces SDPA's flash/efficient/cuDNN kernels, all CUDA, not the CPU's); "
                          "use sp=true with tp for sequence-sharded norms")
    if config.ep > 1 and (not model.n_experts or model.n_experts % config.ep):
        raise ConfigError(f"parallelism: ep={config.ep} must divide the experts of a mixture-of-experts model "
                          f"(this one has n_experts={model.n_experts})")
    others = config.dp_replicate * config.tp * config.pp * config.ep
    dp_shard = config.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise ConfigError(f"parallelism: dp_replicate x tp x pp x ep = {config.dp_replicate} x {config.tp} x "
                              f"{config.pp} x {config.ep} = {others} does not divide the world size {world_size}")
        dp_shard = world_size // others
    if others * dp_shard != world_size:
        raise ConfigError(f"parallelism: dp_replicate x dp_shard x tp x pp x ep = {config.dp_replicate} x {dp_shard} "
                          f"x {config.tp} x {config.pp} x {config.ep} = {others * dp_shard}, but the world size is "
                          f"{world_size} "
                          "(torchrun's --nnodes x --nproc_per_node); the product must equal it")
    if config.tp > 1:
        if model.n_head % config.tp or model.n_kv_head % config.tp:
            raise ConfigError(f"parallelism: tp={config.tp} must divide the attention heads ({model.n_head}) and the "
                              f"key/value heads ({model.n_kv_head}) of the model: each rank holds whole heads")
        d_ff = [model.d_ff] if not model.n_experts else [model.shared_expert_d_ff or config.tp]
        if any(d % config.tp for d in d_ff):
            raise ConfigError(f"parallelism: tp={config.tp} must divide the MLP width {d_ff[0]}")
        if model.vocab_size % config.tp:
            raise ConfigError(f"parallelism: tp={config.tp} must divide the vocabulary ({model.vocab_size}): the "
                              "embedding and the LM head are split by rows")
        if not model.causal or model.post_norm or model.num_labels:
            raise ConfigError("parallelism: tp is built for decoder LMs (pre-norm, causal, LM head); this model is "
                              "an encoder or a classifier")
    if config.sp and config.tp == 1:
        raise ConfigError("parallelism: sp (sequence-parallel norms) shards over the tp ranks; it needs tp > 1")
    if config.sp and context is not None and context % config.tp:
        raise ConfigError(f"parallelism: sp shards each sequence over tp={config.tp} ranks; the context {context} "
                          "must be a multiple of it")
    if config.pp_schedule not in SCHEDULES:
        raise ConfigError(f"parallelism: pp_schedule={config.pp_schedule!r}; expected one of {SCHEDULES}")
    microbatches = config.pp_microbatches or 2 * config.pp
    if config.pp > 1:
        if config.pp > model.n_layer:
            raise ConfigError(f"parallelism: pp={config.pp} stages but the model has {model.n_layer} layers; each "
                              "stage needs at least one")
        why = ("tied embeddings (the first and last stage would share a weight)" if model.tie_embeddings else
               "a mixture of experts (the router's auxiliary loss spans the stages)" if model.n_experts else
               "an encoder or classifier" if not model.causal or model.num_labels or model.post_norm else
               "learned/type positions or an embedding norm" if model.pos_embedding != "rope" or model.type_vocab_size
               or model.embed_norm else
               "value_residual (every layer reads layer 0's values, which live on the first stage)"
               if model.value_residual else
               "unet_skips (the second half's layers read the first half's outputs across stages)"
               if model.unet_skips else None)
        if why:
            raise ConfigError(f"parallelism: pp is built for untied rotary decoder LMs; this model has {why}")
        if batch_size is not None and batch_size % microbatches:
            raise ConfigError(f"parallelism: the batch of {batch_size} sequences cannot be cut into "
                              f"pp_microbatches={microbatches} equal micro-batches")
    return Layout(config.pp, config.dp_replicate, dp_shard, config.ep, config.tp, config.sp, microbatches,
                  config.pp_schedule)


def build_mesh(layout: Layout, device: torch.device):
    """One DeviceMesh ("pp", "dp_replicate", "dp_shard", "ep", "tp"); dimensions of size 1 included, so every plan
    can name the dimension it uses."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, layout.shape, mesh_dim_names=DIMS)


def data_slice(layout: Layout, rank: int) -> tuple[int, int]:
    """(index, count) of global rank `rank`'s data-parallel slice: the ranks of one tp group or one
    pipeline read the same batch. The mesh numbers ranks row-major over (pp, dp_replicate, dp_shard, ep, tp)."""
    coords = []
    for size in reversed(layout.shape):
        rank, c = divmod(rank, size)
        coords.append(c)
    tp, ep, shard, rep, _ = coords
    return rep * layout.dp_shard + shard, layout.dp


# ---- tensor parallel -------------------------------------------------------------------------


def apply_tp(model: nn.Module, mesh, sequence_parallel: bool) -> None:
    """Megatron's split of each block on the tp mesh; each Attention then computes its local heads. The
    embedding and the LM head are split by vocabulary rows (tied, they stay one weight): each rank looks up
    its rows (one all-reduce), and the fused loss (`llmkit.losses.linear_cross_entropy`) runs
    vocabulary-parallel on its rows of the head; `Transformer.logits` gathers the whole logits."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = mesh.size()
    # Under sp the residual stream between sublayers is a DTensor sharded by position (Shard(1)).
    between = Shard(1) if sequence_parallel else Replicate()
    for i, block in enumerate(model.blocks):
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(output_layouts=between,
                                                                                 use_local_output=not sequence_parallel)}
        mlp = block.mlp
        if isinstance(mlp.down_proj, nn.Linear):  # a dense MLP (a MoE block runs whole on each tp rank)
            plan.update({"mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(
                output_layouts=between, use_local_output=not sequence_parallel)})
            if mlp.gate_proj is not None:
                plan["mlp.gate_proj"] = ColwiseParallel()
        if sequence_parallel:
            plan.update({"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                         "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                                    desired_input_layouts=(Replicate(), None, None, None),
                                                    use_local_output=True),
                         "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True)})
            if i == 0:  # the embedding's output (whole on every rank) enters the first block sharded
                plan[""] = PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                              desired_input_layouts=(Shard(1), None, None, None))
        parallelize_module(block, mesh, plan)
        block.attn.n_head //= tp
        block.attn.n_kv_head //= tp
    parallelize_module(model, mesh, {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                                     "lm_head": ColwiseParallel(output_layouts=Replicate())})
    if model.config.tie_embeddings:  # each plan made its own Parameter of the same rows: one weight again
        model.lm_head.weight = model.embed.weight
    if sequence_parallel and not isinstance(model.norm, nn.Identity):
        # the final norm runs on each rank's positions; the LM head and the loss read the whole sequence
        parallelize_module(model, mesh, {"norm": SequenceParallel()})
        parallelize_module(model.norm, mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                                  desired_output_layouts=Replicate(),
                                                                  use_local_output=True))


# ---- expert parallel ---------------------------------------------------------------------------


def apply_ep(model: nn.Module, mesh) -> None:
    """Each MoE block's stacked expert weights split by experts over the ep ranks (DTensors, Shard(0)): a rank
    runs its experts on every token of its batch (the ep ranks share the batch) and one all-reduce sums the
    experts' outputs. The router and a shared expert stay whole."""
    import types

    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import Shard

    from llmkit.moe import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            for name in ("gate_proj", "up_proj", "down_proj"):
                weight = getattr(module, name)
                setattr(module, name, nn.Parameter(distribute_tensor(weight.data, mesh, [Shard(0)])))
            module.ep_mesh = mesh
            module.forward = types.MethodType(_expert_parallel_forward, module)


def _expert_parallel_forward(self, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward with this rank's experts only: x and the routing weights enter through an identity whose
    backward sums the ranks' gradients, the experts' outputs leave through an all-reduce whose backward is
    the identity (Megatron's f and g, here as DTensor redistributions)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Replicate

    mesh, shape = self.ep_mesh, x.shape
    x = x.reshape(-1, shape[-1])
    logits, weights, experts = self.route(x)
    self.router_logits = logits if self.training else None

    def shared_input(t):  # the same on every ep rank; its gradient is the sum of theirs
        return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])

    xs, ws = shared_input(x), shared_input(weights)
    gate, up, down = (p.to_local() for p in (self.gate_proj, self.up_proj, self.down_proj))
    first = mesh.get_local_rank() * gate.shape[0]
    y = torch.zeros_like(x)
    for e in range(gate.shape[0]):
        token, slot = (experts == first + e).nonzero(as_tuple=True)
        if len(token):
            rows = xs[token]
            out = (self.act(rows @ gate[e].t()) * (rows @ up[e].t())) @ down[e].t()
            y = y.index_add(0, token, out * ws[token, slot, None])
    y = DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    return self.add_shared(x, y).reshape(shape)


# ---- FSDP2 ------------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, mesh, layout: Layout) -> None:
    from torch.distributed.fsdp import fully_shard

    dp_mesh = mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"]
    units = list(model.blocks)
    if layout.pp > 1:  # a stage calls these itself, not through the model's forward (the root's hooks)
        units += [m for m in (model.embed, model.norm, model.lm_head) if m is not None]
    for unit in units:
        if any(True for _ in unit.parameters()):
            fully_shard(unit, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)


# ---- pipeline parallel -------------------------------------------------------------------------


def stage_layers(n_layer: int, stages: int, stage: int) -> range:
    """The contiguous blocks of `stage`: as even as possible, earlier stages one more when uneven."""
    base, extra = divmod(n_layer, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class _Absent(nn.Module):
    """Stands in for a block another stage holds, so parameter names (blocks.<i>...) stay the model's."""


class PipelineStageModule(nn.Module):
    """One stage's slice of the trunk: (embedding) -> its blocks -> (final norm -> logits). The model it
    holds keeps only this stage's parameters, under the model's own names."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.model, self.layers, self.first, self.last = model, layers, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llmkit.model import Step, rope_cos_sin

        m, c = self.model, self.model.config
        if self.first:
            x = m.embed(x)
            if c.embed_scale:
                x = x * torch.tensor(c.d_model ** 0.5, dtype=x.dtype)
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)
        step = Step(0, m._masks(None, T, 0, None, x.device))
        ropes = {kind: rope_cos_sin(c, positions, x.dtype, kind) for kind in step.masks}
        for i in self.layers:
            block = m.blocks[i]
            x = block(x, ropes.get(block.attn.kind), step, None)
        if self.last:
            return m.logits(m.norm(x))
        return x


def split_stage(model: nn.Module, layout: Layout, stage: int) -> PipelineStageModule:
    """Drop from `model` everything stage `stage` does not run (so its memory is freed) and wrap the rest."""
    layers = stage_layers(model.config.n_layer, layout.pp, stage)
    first, last = stage == 0, stage == layout.pp - 1
    for i in range(model.config.n_layer):
        if i not in layers:
            model.blocks[i] = _Absent()
    if not first:
        model.embed = None
    if not last:
        model.norm, model.lm_head = None, None
    return PipelineStageModule(model, layers, first, last)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class Parallelized:
    """A model parallelized on the mesh, and how the loop steps, clips and saves it.

    `module` owns this rank's parameters (the Transformer, pruned to its stage under pp); `schedule`
    is the pipeline schedule under pp, else None."""

    def __init__(self, model: nn.Module, layout: Layout, mesh, device: torch.device):
        self.layout, self.mesh, self.device = layout, mesh, device
        self.schedule = self.stage_module = None
        if layout.tp > 1:
            apply_tp(model, mesh["tp"], layout.sp)
        if layout.ep > 1:
            apply_ep(model, mesh["ep"])
        if layout.pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            stage = mesh.get_coordinate()[0]
            self.stage_module = split_stage(model, layout, stage)
        if layout.dp > 1:
            apply_fsdp(model, mesh, layout)
        if layout.pp > 1:
            pp_stage = PipelineStage(self.stage_module, stage, layout.pp, device, group=mesh["pp"].get_group())
            kind = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[layout.schedule]
            self.schedule = kind(pp_stage, layout.microbatches, loss_fn=_lm_loss)
        self.module = model

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.layout.pp > 1 else None

    def pipeline_loss(self, batch, train: bool = True) -> torch.Tensor:
        """One batch through the pipeline (backward too when `train`): its mean loss on every rank."""
        x, y = batch[0], batch[1]
        stage = self.stage_module
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        args = (x,) if stage.first else ()
        kwargs = {"target": y, "losses": losses} if stage.last else {}
        run(*args, **kwargs)
        loss = torch.stack(losses).mean().detach() if stage.last else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pp_group)  # the last stage's loss, on every stage
        return loss

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm over every rank's parameters (DTensor shards reduced over their mesh,
        pipeline stages summed), and the gradients scaled as `clip_grad_norm_` does."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            n = torch.linalg.vector_norm(g, dtype=torch.float32)
            squares = squares + (n.full_tensor() if isinstance(n, DTensor) else n) ** 2
        if self.pp_group is not None:
            dist.all_reduce(squares, group=self.pp_group)
        total = squares.sqrt()
        if max_norm > 0:
            coef = min(max_norm / (float(total) + 1e-6), 1.0)
            with torch.no_grad():
                for g in grads:
                    g.mul_(coef)
        return total

    def full_state(self, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
        """Full (unsharded) model and optimizer state keyed like the plain model, on rank 0 (others: {})."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        pp = self.layout.pp > 1
        options = StateDictOptions(full_state_dict=True, cpu_offload=not pp)
        model_state = get_model_state_dict(self.module, options=options)
        optimizer_state = get_optimizer_state_dict(self.module, optimizer, options=options) if optimizer else None
        if not pp:
            return model_state, optimizer_state
        # each stage's pieces, gathered to global rank 0 (stage ranks in one tp/dp group hold the same)
        mine = ({k: v.cpu() for k, v in model_state.items()}, _cpu(optimizer_state))
        pieces = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, pieces, dst=0)
        if dist.get_rank() != 0:
            return {}, {}
        model_full, opt_full = {}, {"state": {}, "param_groups": []}
        for m, o in pieces:
            model_full.update(m)
            if o:
                opt_full["state"].update(o["state"])
                for i, group in enumerate(o["param_groups"]):
                    if i == len(opt_full["param_groups"]):
                        opt_full["param_groups"].append({**group, "params": []})
                    params = opt_full["param_groups"][i]["params"]
                    params.extend(p for p in group["params"] if p not in params)
        return model_full, opt_full


    def own_part(self, tensors: dict, optimizer_state: dict) -> tuple[dict, dict]:
        """The pieces of a full checkpoint this rank's module holds (under pp: its stage's; else all)."""
        if self.layout.pp == 1:
            return tensors, optimizer_state
        mine = set(self.module.state_dict())
        groups = [{**g, "params": [p for p in g["params"] if p in mine]} for g in optimizer_state["param_groups"]]
        return ({k: v for k, v in tensors.items() if k in mine},
                {"state": {k: v for k, v in optimizer_state["state"].items() if k in mine}, "param_groups": groups})


def _cpu(state):
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_cpu(v) for v in state]
    return state


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds (a DTensor counts its local shard)."""
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
