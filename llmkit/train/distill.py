"""Knowledge distillation (Hinton et al. 2015): a small student learns from a teacher's soft labels.

`run(DistillConfig(...))` trains a student (a preset, or a checkpoint) on token shards with
alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE on the real next tokens, through the
pretraining data path and the one training loop. The teacher is frozen and must share the
student's tokenizer. `alpha=0` is the hard-label baseline with everything else equal, so two runs
compare soft against hard labels for the same steps; held-out perplexity is exp(val_ce).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from llmkit.data.shards import ShardLoader, read_meta
from llmkit.errors import ConfigError
from llmkit.losses import check_distillation
from llmkit.model import load
from llmkit.tokenizer import Tokenizer, check_same_tokenizer
from llmkit.train import distributed as dist_
from llmkit.train.loop import TrainResult, resolve_device, train
from llmkit.train.objectives import distill_objective
from llmkit.train.pretrain import (
    PretrainConfig,
    build_model,
    held_out_batches,
    tokenizer_folder,
    train_and_val_dirs,
)
from llmkit.train.report import run_summary, write_report


@dataclass
class DistillConfig(PretrainConfig):
    teacher: str = field(default="", metadata={"help": "the teacher: a checkpoint or run folder, or a model name"})
    model: str = field(default="llama-tiny", metadata={"help": "the student: a preset or a checkpoint folder"})
    temperature: float = field(default=2.0, metadata={"help": "softens both distributions (T > 0)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the soft-label term; 0 = hard labels only"})
    out_dir: str = "runs/distill"

    def validate(self) -> None:
        super().validate()
        check_distillation(self.temperature, self.alpha)


def run(config: DistillConfig) -> TrainResult:
    config.validate()
    train_dir, val_dir = train_and_val_dirs(config.data)
    meta = read_meta(train_dir)
    teacher, teacher_tok = load(config.teacher, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(tokenizer_folder(config))
    check_same_tokenizer(tokenizer, teacher_tok, f"teacher {config.teacher!r}")
    torch.manual_seed(config.seed)
    student = build_model(config, teacher.config.vocab_size)
    if student.config.vocab_size != teacher.config.vocab_size or meta["vocab_size"] > student.config.vocab_size:
        raise ConfigError(f"student vocabulary {student.config.vocab_size} differs from the teacher's "
                          f"{teacher.config.vocab_size}; expected the same tokenizer and vocabulary")
    device = resolve_device(config.device)
    teacher.requires_grad_(False).eval().to(device)
    world = dist_.init(device)
    data = ShardLoader(train_dir, config.batch_size, config.context, seed=config.seed)
    eval_batches = held_out_batches(val_dir, config, world) if val_dir is not None else None
    result = train(student, distill_objective(teacher, config.temperature, config.alpha), data, config,
                   config.out_dir, eval_batches=eval_batches, write_extra=tokenizer.save_pretrained,
                   tokens_per_step=config.batch_size * config.context * config.grad_accum,
                   run_config=dataclasses.asdict(config))
    evals = [r for r in result.history if "val_ce" in r]
    report = {"command": "distill", "config": dataclasses.asdict(config), **run_summary(result),
              "student_parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters(),
              # held-out perplexity is exp(hard-label CE), not exp(the mixed loss)
              "evals": [{"step": r["step"], "val_ce": r["val_ce"], "val_ppl": math.exp(r["val_ce"]),
                         "val_kl": r.get("val_kl")} for r in evals]}
    if evals:
        report["held_out_perplexity"] = math.exp(evals[-1]["val_ce"])
    write_report(config.out_dir, f"Distillation (T={config.temperature}, alpha={config.alpha})", report, [
        f"- student `{config.model}` ({report['student_parameters']:,} parameters), teacher `{config.teacher}` "
        f"({report['teacher_parameters']:,}), data `{config.data}`, seed {config.seed}"])
    return dataclasses.replace(result, report=report)
