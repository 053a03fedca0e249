"""`llmkit prune`: calibrate, prune (unstructured or structured), save as an HF folder (and GGUF), and
for structured pruning recover by distillation from the unpruned model (train/distill.py, the one
training loop). The pruning itself is library code in quant/ (prune.py, structured.py); this module is
the glue that needs the train floor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from llmkit.errors import ConfigError
from llmkit.formats.gguf import write_gguf
from llmkit.model import load
from llmkit.quant import prune as unstructured
from llmkit.quant import structured
from llmkit.quant.calibrate import calibrate, source_batches
from llmkit.train import distill
from llmkit.train.report import write_report


@dataclass
class PruneConfig:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "the model to prune (folder, .gguf, name)"})
    out_dir: str = field(default="runs/prune", metadata={"help": "pruned/ (HF folder), pruned.gguf, report"})
    method: Literal["magnitude", "wanda", "structured"] = field(default="wanda", metadata={
        "help": "magnitude or wanda (unstructured zeros), or structured (a smaller dense model)"})
    sparsity: float = field(default=0.5, metadata={"help": "unstructured: fraction of each layer's weights zeroed"})
    n_m: str | None = field(default=None, metadata={"help": "unstructured N:M pattern along the inputs, e.g. 2:4"})
    n_head: int | None = field(default=None, metadata={"help": "structured: query heads kept (whole GQA groups)"})
    d_ff: int | None = field(default=None, metadata={"help": "structured: MLP channels kept"})
    n_layer: int | None = field(default=None, metadata={"help": "structured: layers kept"})
    calibration: str = field(default="wikipedia", metadata={"help": "packaged text source (training documents)"})
    calibration_tokens: int = field(default=16384, metadata={"help": "calibration tokens"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration chunk"})
    gguf: str | None = field(default="F32", metadata={"help": "also write pruned.gguf at this file type; none: skip"})
    recover_steps: int = field(default=0, metadata={"help": "structured: distillation steps from the unpruned model"})
    recover_data: str = field(default="", metadata={"help": "token shards (made with the model's tokenizer)"})
    recover_lr: float = field(default=3e-4, metadata={"help": "peak learning rate of the recovery"})
    recover_batch_size: int = 8
    recover_context: int = 256

    def validate(self) -> None:
        unstructured.check_sparsity(self.sparsity)
        unstructured.parse_n_m(self.n_m)
        if self.recover_steps and self.method != "structured":
            raise ConfigError(f"recover_steps={self.recover_steps} with method={self.method!r}: recovery trains "
                              "dense weights and would refill the zeros; expected method='structured'")
        if self.recover_steps and not self.recover_data:
            raise ConfigError("recover_steps > 0 needs recover_data (token shards made with the model's tokenizer)")


def run(config: PruneConfig) -> dict[str, Any]:
    config.validate()
    model, tokenizer = load(config.model, dtype=torch.float32)
    batches = source_batches(tokenizer, config.calibration, config.calibration_tokens, config.seq_len)
    before = model.num_parameters()
    if config.method == "structured":
        model = structured.prune_structured(model, structured.importance(model, batches), config.n_head,
                                            config.d_ff, config.n_layer)
        achieved = None
    else:
        stats = calibrate(model, batches) if config.method == "wanda" else None
        achieved = unstructured.prune(model, config.method, config.sparsity, config.n_m, stats)
    out = Path(config.out_dir)
    folder = out / "pruned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    report: dict[str, Any] = {"command": "prune", "config": dataclasses.asdict(config), "parameters_before": before,
                              "parameters_after": model.num_parameters(), "pruned": str(folder)}
    if achieved is not None:
        report["sparsity"] = sum(achieved.values()) / len(achieved)
    if config.gguf and config.gguf.lower() != "none":
        write_gguf(out / "pruned.gguf", model.config, model.state_dict(), tokenizer, quant=config.gguf)
        report["gguf"] = str(out / "pruned.gguf")
    if config.recover_steps:
        result = distill.run(distill.DistillConfig(
            teacher=config.model, model=str(folder), data=config.recover_data, tokenizer=str(folder),
            out_dir=str(out / "recovered"), max_steps=config.recover_steps, lr=config.recover_lr,
            warmup_steps=max(1, config.recover_steps // 10), batch_size=config.recover_batch_size,
            context=config.recover_context, eval_every=0, save_every=0))
        report["recovered"] = str(result.last_checkpoint)
        report["recovery"] = {k: result.report.get(k) for k in ("held_out_perplexity", "steps")}
    write_report(out, f"Pruning ({config.method}) of {config.model}", report, [
        f"- parameters {before:,} -> {report['parameters_after']:,}; calibration {config.calibration_tokens} tokens "
        f"of `{config.calibration}`"])
    return report
