"""The one training loop. Every objective (pretraining, SFT, classification, reward, DPO,
distillation) is a function `(model, batch) -> (loss, metrics)` run by `train`.

Per optimizer step (`TrainingStep`, which the speedrun's calibration times too): `grad_accum`
micro-batches (forward under autocast, backward of loss / grad_accum), gradient clipping, a NaN/inf
guard, the optimizer (AdamW, or Muon with AdamW: `optimizers`) at the scheduled learning rate.
`train` returns a `TrainResult`, as every recipe around it does (theirs with the report they wrote). Around
it: periodic evaluation, metrics.jsonl + a tqdm bar, atomic checkpoints with everything needed to
resume bit-exactly (optimizer, RNG, data position), SIGTERM/SIGINT handling, a wall-clock budget,
and the same code under torchrun (DDP or FSDP2).

`data` is any object with `next_batch()`, `state_dict()` and `load_state_dict(state)`; its
`next_batch()` returns the micro-batch of this rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmkit import progress
from llmkit.analysis.energy import EnergyMeter
from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, FormatError, LlmkitError, StorageError
from llmkit.train import checkpoint, optimizers, parallel
from llmkit.train import distributed as dist_
from llmkit.train.schedules import SCHEDULES, batch_shape, check_batch_schedule, lr_factor

Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainingDiverged(LlmkitError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class LoopConfig(parallel.ParallelConfig):
    """Optimisation and bookkeeping for `train`; recipes and CLI flags fill it (the parallelism sizes
    come first, from `parallel.ParallelConfig`)."""

    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "wall-clock budget; stops and saves when spent, and the schedule then runs on whichever of "
                "steps or time is further along, so its decay ends when the budget does"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak"})
    schedule: str = field(default="cosine", metadata={"help": f"one of {SCHEDULES}"})
    warmup_steps: int = 100
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: fraction of steps in the cooldown"})
    seq_warmup: float = field(default=0.0, metadata={
        "help": "share of training over which token batches' sequences grow from seq_start to the context, doubling "
                "(the same tokens per step: windows are cut into shorter rows); 0: off"})
    seq_start: int = field(default=64, metadata={"help": "sequence length at the start of seq_warmup"})
    batch_warmup: float = field(default=0.0, metadata={
        "help": "share of training over which a step's rows grow linearly from batch_start of the batch to all "
                "of it (the rest are skipped); 0: off"})
    batch_start: float = field(default=0.25, metadata={"help": "share of the rows at the start of batch_warmup"})
    weight_decay: float = field(default=0.1, metadata={"help": "decay of matrices (never norms or biases)"})
    optimizer: str = field(default="adamw", metadata={
        "help": f"one of {optimizers.OPTIMIZERS}; muon: Muon on the blocks' matrices, AdamW on the rest"})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon's peak learning rate (lr is AdamW's)"})
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm (0 disables)"})
    precision: str = field(default="auto", metadata={"help": "fp32, bf16 (autocast) or auto"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations (0: only at the end)"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints (0: only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    log_every: int = field(default=10, metadata={"help": "steps between throughput readings"})
    seed: int = 1337
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in out_dir"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm bar"})

    def validate(self) -> None:
        for name in ("max_steps", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "log_every", "weight_decay",
                     "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r}; expected auto, fp32 or bf16")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise ConfigError(f"AdamW needs 0 <= beta < 1 and eps > 0, got betas=({self.beta1}, {self.beta2}), "
                              f"eps={self.eps}")
        if self.optimizer not in optimizers.OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}; expected one of {optimizers.OPTIMIZERS}")
        if not (self.muon_lr > 0 and 0 <= self.muon_momentum < 1):
            raise ConfigError(f"Muon needs muon_lr > 0 and 0 <= muon_momentum < 1, got {self.muon_lr}, "
                              f"{self.muon_momentum}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")
        check_batch_schedule(self.seq_start, self.seq_warmup, self.batch_start, self.batch_warmup)


@dataclass
class TrainResult:
    """What the loop, and every recipe around it, returns: one shape for all of them."""

    step: int
    stopped: str  # "max_steps", "budget", "signal"
    last_checkpoint: Path | None
    history: list[dict[str, Any]]  # the records of metrics.jsonl
    out_dir: Path | None = None  # the run folder
    report: dict[str, Any] = field(default_factory=dict)  # a recipe's report.json (empty from the bare loop)
    energy: dict[str, Any] = field(default_factory=dict)  # joules and CO2 of the loop (llmkit.analysis.energy)


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it pays (CUDA with bf16), fp32 otherwise; explicit choices are honoured."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class TrainingStep:
    """One optimizer step, the same for the loop and for whatever times it (the speedrun's
    calibration): `grad_accum` micro-batches (forward under autocast, backward of loss / grad_accum,
    DDP's gradient all-reduce on the last one only), the global gradient norm clipped, a NaN/inf
    guard, then the update. `model` owns the parameters; the batches run through `forward_model`
    (compiled with `compile`, falling back to `model` if the compiler fails)."""

    def __init__(self, model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                 device: torch.device, *, grad_accum: int = 1, grad_clip: float = 1.0,
                 amp_dtype: torch.dtype | None = None, compile: bool = False, world: dist_.World | None = None,
                 parallelized: parallel.Parallelized | None = None):
        self.model, self.objective, self.optimizer, self.device = model, objective, optimizer, device
        self.parallelized = parallelized  # tp/pp/2D: its own pipeline step and gradient norm
        self.grad_accum, self.grad_clip, self.amp_dtype = grad_accum, grad_clip, amp_dtype
        self.world = world or dist_.World()
        self.forward_model = torch.compile(model) if compile else model

    def __call__(self, next_batch: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss averaged over micro-batches and ranks, gradient norm, the objective's other metrics
        summed over micro-batches). Raises TrainingDiverged, before any update, if either is not finite."""
        loss_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, torch.Tensor] = {}  # the objective's other metrics (rewards, accuracy, ...)
        self.tokens = 0  # input tokens of this step on this rank
        for micro in range(self.grad_accum):
            batch = _to_device(next_batch(), self.device)
            self.tokens += _tokens(batch)
            if self.parallelized is not None and self.parallelized.schedule is not None:
                with _autocast(self.device, self.amp_dtype):  # backward runs inside the schedule
                    loss, metrics = self.parallelized.pipeline_loss(batch), {}
            else:
                with _no_sync(self.model, micro == self.grad_accum - 1):
                    with _autocast(self.device, self.amp_dtype):
                        loss, metrics = self._forward(batch)
                    (loss / self.grad_accum).backward()
            for k, v in _extra_metrics(metrics).items():
                extra_sums[k] = extra_sums.get(k, 0) + v
            loss_sum += loss.detach().float()
        loss_value = dist_.all_reduce_mean(loss_sum / self.grad_accum, self.world)
        if self.parallelized is not None:
            if self.parallelized.schedule is not None and self.grad_accum > 1:  # the schedule averaged micro-batches
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.div_(self.grad_accum)
            grad_norm = self.parallelized.clip_grad_norm(self.grad_clip)
        else:
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                         if self.grad_clip > 0 else _grad_norm(self.model))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        if not (math.isfinite(loss_value.item()) and math.isfinite(float(grad_norm))):
            raise TrainingDiverged(f"loss={loss_value.item()}, grad_norm={float(grad_norm)}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, extra_sums

    def _forward(self, batch):
        try:
            return self.objective(self.forward_model, batch)
        except Exception as e:  # a compiler failure falls back to eager, anything else raises
            if self.forward_model is self.model or not _is_compile_error(e):
                raise
            tqdm.write(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); continuing without it")
            self.forward_model = self.model
            return self.objective(self.forward_model, batch)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so the loop saves before exiting."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(model: nn.Module, objective: Objective, data, config: LoopConfig, out_dir: str | Path, *,
          model_config: ModelConfig | None = None, eval_batches: Callable[[], Iterable] | None = None,
          tokens_per_step: int | None = None, bytes_per_token: float | None = None,
          flops_per_token: int | None = None, strategy: str = "auto",
          write_extra: Callable[[Path], None] | None = None, run_config: dict | None = None,
          save_weights: Callable[[Path, dict], None] | None = None,
          load_weights: Callable[[Path], dict] | None = None) -> TrainResult:
    """Train `model` on `data` with `objective`; write metrics and checkpoints under `out_dir`.

    eval_batches: returns a fresh iterable over the same validation batches each call.
    tokens_per_step / flops_per_token: for throughput and MFU in the log (global, all ranks).
    bytes_per_token: UTF-8 bytes per token of the validation text, for bits per byte.
    write_extra: writes extra files (the tokenizer) into each checkpoint folder.
    save_weights / load_weights: write and read the model state in another layout than an HF folder
        (a LoRA run saves only its adapter); load_weights returns the full state dict to resume from.
    """
    config.validate()
    if config.warmup_steps >= config.max_steps:
        progress.warn(f"warmup_steps={config.warmup_steps} >= max_steps={config.max_steps}: the learning rate never "
                      f"reaches lr={config.lr} (it is still warming up when training ends)")
    meter = EnergyMeter().start()
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    world = dist_.init(device)
    model_config = model_config or getattr(model, "config", None)
    amp_dtype = autocast_dtype(config.precision, device)

    layout = parallel.check(config, model_config, world.size) if parallel.active(config) else None  # before compute
    if layout is not None and strategy not in ("auto", "fsdp"):
        raise ConfigError(f"distributed={strategy!r} with parallelism sizes: the sizes choose the strategy "
                          "(dp_shard is FSDP2); leave distributed at auto")

    torch.manual_seed(config.seed)
    model.to(device)
    parallelized = None
    if layout is not None and world.distributed:
        parallelized = parallel.Parallelized(model, layout, parallel.build_mesh(layout, device), device)
        model = parallelized.module
    else:
        model = dist_.wrap(model, strategy, world, device)
    optimizer = optimizers.build(model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                                 betas=(config.beta1, config.beta2), eps=config.eps, muon_lr=config.muon_lr,
                                 muon_momentum=config.muon_momentum)

    if not config.resume and (earlier := checkpoint.latest(out_dir)) is not None:
        raise ConfigError(f"{out_dir} holds a checkpoint of an earlier run ({earlier.name}); pass --resume to "
                          "continue it, or another --out-dir for a new run (a new run there would mix with it)")
    step, tokens_seen, history = 0, 0, []
    metrics_path = out_dir / "metrics.jsonl"
    if config.resume and (found := checkpoint.latest(out_dir)) is not None:
        step, tokens_seen, history = _resume(found, model, optimizer, data, model_config, metrics_path, world,
                                             load_weights, parallelized)
    elif world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
        (out_dir / "config.json").write_text(json.dumps(run_config or dataclasses.asdict(config), indent=2) + "\n")
    last_checkpoint = checkpoint.latest(out_dir) if config.resume else None
    training_step = TrainingStep(model, objective, optimizer, device, grad_accum=config.grad_accum,
                                 grad_clip=config.grad_clip, amp_dtype=amp_dtype, compile=config.compile, world=world,
                                 parallelized=parallelized)

    shaping = bool(config.seq_warmup or config.batch_warmup)
    if shaping and parallelized is not None:
        raise ConfigError("seq_warmup / batch_warmup change the batch's shape from step to step; tensor and pipeline "
                          "parallel stages take one fixed micro-batch shape: leave them at 0 there")
    if config.batch_warmup:
        tokens_per_step = None  # a step's tokens grow with its rows: count them

    def next_batch() -> Any:
        """The data's next micro-batch, shaped for where training is (the batch-shape schedules)."""
        batch = data.next_batch()
        if not shaping:
            return batch
        at = _schedule_step(step, budget_used, config) / config.max_steps
        return batch_shape(batch, at, config.seq_start, config.seq_warmup, config.batch_start, config.batch_warmup)

    peak = None
    if flops_per_token:
        from llmkit.analysis.accounting import measure_peak_flops

        peak = measure_peak_flops(device, amp_dtype or torch.float32) * world.size

    def save(at_step: int) -> Path | None:
        if parallelized is not None:
            model_state, optimizer_state = parallelized.full_state(optimizer)
        else:
            model_state = dist_.full_model_state(model)
            optimizer_state = dist_.full_optimizer_state(model, optimizer)
        path = None
        if world.is_main:
            path = checkpoint.save(out_dir, at_step, model_config, model_state, optimizer_state,
                                   {"tokens_seen": tokens_seen, "data": data.state_dict(),
                                    "world_size": world.size,
                                    "model_config": None if model_config is None else model_config.to_dict()},
                                   keep_last=config.keep_last, write_extra=write_extra, save_weights=save_weights)
        dist_.barrier(world)
        return path

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if world.is_main:
            try:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: one clear error, not a traceback
                raise StorageError(f"cannot append to {metrics_path}: {e.strerror}") from None

    def evaluate() -> dict[str, float]:
        # Each batch's means count for the examples it holds, so a short last batch (36 held-out pairs in
        # batches of 8) weighs what it holds, and val_accuracy is the share of examples right.
        sums, examples = {}, 0
        model.eval()
        with torch.no_grad(), _autocast(device, amp_dtype):
            for batch in progress.bar(eval_batches(), "validation", config.progress and world.is_main):
                if parallelized is not None and parallelized.schedule is not None:
                    loss, metrics = parallelized.pipeline_loss(_to_device(batch, device), train=False), {}
                else:
                    loss, metrics = objective(training_step.forward_model, _to_device(batch, device))
                rows = _rows(batch)
                for k, v in {"loss": loss.float(), **_extra_metrics(metrics)}.items():
                    sums[k] = sums.get(k, 0) + v * rows
                examples += rows
        model.train()
        means = {k: dist_.all_reduce_mean(v / examples, world).item() for k, v in sums.items()}
        loss = means.pop("loss")
        result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        result.update({f"val_{k}": v for k, v in means.items()})
        if bytes_per_token:
            result["val_bpb"] = loss / math.log(2) / bytes_per_token
        return result

    model.train()
    stopped = "max_steps"
    started = time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=step, desc="train", disable=not (config.progress and world.is_main),
               dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    budget_used = 0.0  # fraction of max_minutes spent, the same on every rank
    with _StopSignal() as stop:
        while step < config.max_steps:
            factor = lr_factor(_schedule_step(step, budget_used, config), config.schedule, config.warmup_steps,
                               config.max_steps, config.min_lr_ratio, config.decay_fraction)
            lr = config.lr * factor
            for group in optimizer.param_groups:  # each at its own peak (Muon's and AdamW's differ)
                group["lr"] = group.get("initial_lr", config.lr) * factor
            try:
                loss_value, grad_norm, extra_sums = training_step(next_batch)
            except TrainingDiverged as e:
                bar.close()
                where = checkpoint.latest(out_dir)
                raise TrainingDiverged(
                    f"training diverged at step {step}: {e}; no update was applied. Last good checkpoint: "
                    f"{where or 'none'}. Lower the learning rate, raise warmup, or use fp32.") from None
            step += 1
            step_tokens = tokens_per_step or round(
                dist_.all_reduce_mean(torch.tensor(float(training_step.tokens)), world).item()
                * (layout.dp if parallelized is not None else world.size))
            tokens_seen += step_tokens
            window_tokens += step_tokens
            record = {"step": step, "loss": loss_value.item(), "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_seen": tokens_seen, "elapsed_s": round(time.perf_counter() - started, 3)}
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)  # the step just logged
            bar.update(1)
            record.update({k: v.item() / config.grad_accum for k, v in extra_sums.items()})
            if step % max(config.log_every, 1) == 0 or step == 1:
                elapsed = time.perf_counter() - window_start
                if step_tokens:
                    record["tokens_per_s"] = window_tokens / elapsed
                    if peak:
                        record["mfu"] = record["tokens_per_s"] * flops_per_token / peak
                window_start, window_tokens = time.perf_counter(), 0
            log(record)

            if config.max_minutes is not None:
                budget_used = (time.perf_counter() - started) / (60 * config.max_minutes)
            signalled, budget_used = dist_.max_over_ranks([float(stop.received is not None), budget_used], world)
            must_stop = signalled > 0 or budget_used > 1
            if eval_batches is not None and config.eval_every and step % config.eval_every == 0 \
                    and step < config.max_steps and not must_stop:
                log({"step": step, **evaluate()})
            if must_stop:
                stopped = "signal" if signalled > 0 else "budget"
                break
            if config.save_every and step % config.save_every == 0 and step < config.max_steps:
                last_checkpoint = save(step)
        bar.close()
        if eval_batches is not None:
            log({"step": step, **evaluate()})
        last_checkpoint = save(step)
    return TrainResult(step=step, stopped=stopped, last_checkpoint=last_checkpoint, history=history, out_dir=out_dir,
                       energy=meter.result())


def _schedule_step(step: int, budget_used: float, config: LoopConfig) -> int:
    """The step the schedule reads. Under a wall-clock budget it is the step or the budget's used
    fraction of `max_steps`, whichever is further: when steps run slower than planned, the cosine or
    WSD decay still ends with the budget instead of being cut off at a high learning rate. (Time makes
    the schedule depend on the machine's speed: runs that must resume exactly set no budget.) Warmup
    counts steps only."""
    if step < config.warmup_steps:  # (without a budget, budget_used stays 0)
        return step
    return max(step, min(config.max_steps - 1, int(budget_used * config.max_steps)))


def _resume(path, model, optimizer, data, model_config, metrics_path, world, load_weights=None, parallelized=None):
    """Everything is read and checked (checksums, shapes) before anything is loaded, so a bad checkpoint
    raises one FormatError naming the file and leaves the model and optimizer as they were."""
    state, optimizer_state, rng = checkpoint.load_state(path)
    saved = state.get("model_config")
    if model_config is not None and saved is not None:
        ours = {k: v for k, v in model_config.to_dict().items() if k != "name"}
        theirs = {k: v for k, v in saved.items() if k != "name"}
        if ours != theirs:
            diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
            raise ConfigError(f"cannot resume from {path}: the checkpoint's model differs from this run's "
                              f"(field: (checkpoint, run)) {diff}")
    if state.get("world_size", 1) != world.size:
        raise ConfigError(f"cannot resume from {path}: it was written by {state['world_size']} processes, this run "
                          f"has {world.size}; resume with the same world size")
    from llmkit.formats import hf

    tensors = load_weights(path) if load_weights is not None else hf.load_checkpoint(path)[1]
    inner = dist_.unwrap(model)
    if parallelized is not None:  # a pipeline stage loads its own pieces of the full checkpoint
        tensors, optimizer_state = parallelized.own_part(tensors, optimizer_state)
    names = {id(p): n for n, p in inner.named_parameters()}
    checkpoint.check_fits(path, tensors, optimizer_state, {k: v.shape for k, v in inner.state_dict().items()},
                          [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups])
    data.load_state_dict(state["data"])
    checkpoint.set_rng_state(rng)
    try:
        dist_.load_full_state(model, optimizer, tensors, optimizer_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise FormatError(f"cannot resume from {path}: {e}") from None
    step = state["step"]
    history = []
    if world.is_main and metrics_path.is_file():  # drop records from after the checkpoint (a killed run)
        kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        history = [json.loads(line) for line in kept]
    return step, state.get("tokens_seen", 0), history


def _extra_metrics(metrics: dict) -> dict[str, torch.Tensor]:
    """An objective's scalar metrics beyond the loss and token count, as detached fp32 tensors."""
    return {k: v.detach().float() for k, v in metrics.items() if k not in ("loss", "tokens")
            and isinstance(v, torch.Tensor) and v.numel() == 1}


def _tokens(batch) -> int:
    """How many input tokens a batch holds: its attention mask's ones (padding is not read), else its
    inputs' size."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return _tokens(batch["input_ids"] if "input_ids" in batch else next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return _tokens(batch[0])
    return batch.numel()


def _rows(batch) -> int:
    """How many examples (sequences, or both replies of each pair) a batch holds: its inputs' leading size."""
    if isinstance(batch, dict):
        return _rows(batch["input_ids"] if "input_ids" in batch else next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return _rows(batch[0])
    return batch.shape[0]


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _no_sync(model: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch."""
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _is_compile_error(error: BaseException) -> bool:
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
