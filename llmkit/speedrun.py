"""The CPU speedrun: packaged raw text to a small Llama-style model that writes English, in minutes.

fetch the corpora -> clean, dedup and mix them -> train a byte-level BPE -> tokenize to shards ->
pretrain within the wall-clock budget -> evaluate -> sample -> `runs/<name>/report.md` (with
`report.json` and the loss curves as PNG). Training stops on the clock: the loop's schedule follows
the budget's elapsed fraction (llmkit/train/loop.py), so the cosine decay ends when the budget does
however fast the steps turn out; a short timing of the real step only sets an upper bound on steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit import progress
from llmkit.analysis.accounting import human
from llmkit.analysis.plots import plot_training_curves
from llmkit.data.prepare import PrepareConfig, parse_weights, prepare, read_documents
from llmkit.data.shards import tokenize_prepared
from llmkit.errors import ConfigError
from llmkit.files import atomic_write_json, atomic_write_text
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import optimizers, pretrain
from llmkit.train.loop import TrainingStep, autocast_dtype, resolve_device
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.pretrain import PretrainConfig

DEFAULT_PROMPTS = ("The history of the city", "In a statement on Monday, the government", "Scientists have found that")


@dataclass
class SpeedrunConfig:
    name: str = field(default="speedrun", metadata={"help": "the run folder is runs/<name>"})
    runs_dir: str = "runs"
    budget_minutes: float = field(default=10.0, metadata={"help": "wall clock for the whole pipeline"})
    sources: str = field(default="wikipedia:0.5,bbcnews:0.5", metadata={"help": "NAME:WEIGHT,... mixture"})
    max_docs_per_source: int | None = field(default=None, metadata={
        "help": "read only the first N documents of each source (a quick run; default: all)"})
    vocab_size: int = 4096
    model: str = field(default="llama-2m", metadata={"help": "model preset (its vocabulary is the tokenizer's); "
                                                            "chosen by the sweep in docs/speedrun.md"})
    model_options: str = field(default="qk_norm=true,tie_embeddings=false,value_residual=true", metadata={
        "help": "FIELD=VALUE,... ModelConfig fields changed from the preset (the default: the ablation's best, "
                "docs/speedrun.md; '' for the plain preset)"})
    context: int = 256
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    schedule: str = field(default="wsd", metadata={"help": "wsd (warmup-stable-decay) or cosine"})
    seq_warmup: float = field(default=0.0, metadata={"help": "share of training with sequences growing from "
                                                             "seq_start to the context (0: off; docs/speedrun.md "
                                                             "says why it is off)"})
    seq_start: int = 64
    batch_warmup: float = field(default=0.0, metadata={"help": "share of training with a step's rows growing from "
                                                               "batch_start of the batch (0: off)"})
    batch_start: float = 0.25
    optimizer: str = field(default="muon", metadata={"help": "muon (Muon on the blocks' matrices, AdamW on the "
                                                             "rest) or adamw"})
    muon_lr: float = field(default=0.02, metadata={"help": "Muon's peak learning rate (lr is AdamW's)"})
    precision: str = field(default="auto", metadata={
        "help": "fp32, bf16 (autocast), or auto: whichever of the two the calibration times faster here "
                "(bf16 is 1.3x faster on a 2-core EPYC, 0.6x on a 2-core Xeon without AMX)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step (costs a minute, "
                                                          "then runs faster)"})
    eval_every: int = 100
    eval_batches: int = 20
    seed: int = 1337
    samples_per_prompt: int = 1
    sample_tokens: int = 60
    reserve_minutes: float = field(default=0.5, metadata={"help": "kept for evaluation, sampling and the report"})


@contextlib.contextmanager
def _stage(timings: dict, name: str):
    """A stage of the run: announced when it starts, timed into `timings` when it ends."""
    print(f"[speedrun] {name} ...", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"[speedrun] {name}: {timings[name]} s", flush=True)


def seconds_per_step(model: Transformer, config: SpeedrunConfig, precisions: tuple[str, ...],
                     rounds: int = 5) -> dict[str, float]:
    """Median time of the loop's own training step (`TrainingStep`: forward, backward, clipping, the optimizer)
    on random tokens in each precision. Each precision first takes two warm-up steps (compiled, they
    fill inductor's cache, so the real run does not compile from scratch again); then the precisions
    take turns, so that the cold start of a fresh process and a noisy neighbour do not favour either."""
    device = resolve_device("auto")
    x = torch.randint(0, model.config.vocab_size, (config.batch_size, config.context), device=device)
    batch = (x, torch.roll(x, -1, 1))
    steps = {}
    for precision in progress.bar(precisions, "compile and warm up" if config.compile else "warm up"):
        probe = Transformer(model.config).to(device).train()
        optimizer = optimizers.build(probe, config.optimizer, lr=1e-4, weight_decay=0.1, muon_lr=config.muon_lr)
        step = TrainingStep(probe, causal_lm_loss, optimizer, device,
                            amp_dtype=autocast_dtype(precision, device), compile=config.compile)
        steps[precision] = functools.partial(step, lambda: batch)
        steps[precision]()
        steps[precision]()
    times = {precision: [] for precision in precisions}
    for _ in progress.bar(range(rounds), f"time a step ({', '.join(precisions)})"):
        for precision, step in steps.items():
            start = time.perf_counter()
            step()
            times[precision].append(time.perf_counter() - start)
    return {precision: sorted(t)[len(t) // 2] for precision, t in times.items()}


def speedrun(config: SpeedrunConfig) -> Path:
    if config.budget_minutes <= config.reserve_minutes:
        raise ConfigError(f"budget_minutes={config.budget_minutes} leaves no time to train "
                          f"(reserve_minutes={config.reserve_minutes})")
    t0 = time.perf_counter()
    deadline = t0 + 60 * config.budget_minutes
    run = Path(config.runs_dir) / config.name
    run.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _stage(timings, "fetch + prepare"):
        data_report = prepare(parse_weights(config.sources), run / "data",
                              PrepareConfig(seed=config.seed, max_docs_per_source=config.max_docs_per_source),
                              progress=True)

    with _stage(timings, "tokenizer"):
        texts = [d.text for d in read_documents(run / "data" / "train.jsonl")]
        tokenizer = Tokenizer.train(texts, config.vocab_size, show_progress=True)
        tokenizer.save_pretrained(run / "tokenizer")

    with _stage(timings, "tokenize"):
        metas = tokenize_prepared(run / "data", tokenizer, run / "shards", progress=True)

    with _stage(timings, "calibrate"):
        torch.manual_seed(config.seed)
        shape = pretrain.build_model(PretrainConfig(model=config.model, model_options=config.model_options),
                                     tokenizer.vocab_size)
        timed = seconds_per_step(shape, config,
                                 ("fp32", "bf16") if config.precision == "auto" else (config.precision,))
        precision = min(timed, key=timed.get)  # auto: the faster one trains
        print(f"[speedrun] s/step: {', '.join(f'{p} {t:.3f}' for p, t in timed.items())} -> {precision}",
              flush=True)
        per_step = timed[precision]
        train_seconds = deadline - time.perf_counter() - 60 * config.reserve_minutes
        if train_seconds <= 0:
            raise ConfigError(f"budget_minutes={config.budget_minutes} was used up before training: data, tokenizer "
                              f"and calibration took {time.perf_counter() - t0:.0f} s and {config.reserve_minutes} "
                              "min are kept for evaluation (reserve_minutes); raise --budget-minutes")
        # The timing is rough (a shared machine's step time swings: one calibration read 0.58 s/step
        # for a run that then went at 0.35), so leave room: the budget, not max_steps, should end the
        # run. A generous max_steps costs nothing, since under the budget the schedule follows the clock.
        max_steps = max(10, int(3 * train_seconds / per_step))
    print(f"[speedrun] {per_step:.3f} s/step -> at most {max_steps} steps in {train_seconds / 60:.1f} min",
          flush=True)

    with _stage(timings, "pretrain"):
        if (run / "train").exists():  # a speedrun is rebuilt whole: data, tokenizer, shards and the training
            shutil.rmtree(run / "train")
        pre = PretrainConfig(
            model=config.model, model_options=config.model_options, data=str(run / "shards"), tokenizer=str(run / "tokenizer"),
            out_dir=str(run / "train"), context=config.context, batch_size=config.batch_size, max_steps=max_steps,
            max_minutes=train_seconds / 60, lr=config.lr, warmup_steps=min(config.warmup_steps, max_steps // 10),
            min_lr_ratio=config.min_lr_ratio, schedule=config.schedule, optimizer=config.optimizer,
            seq_warmup=config.seq_warmup, seq_start=config.seq_start, batch_warmup=config.batch_warmup,
            batch_start=config.batch_start,
            muon_lr=config.muon_lr, precision=precision, compile=config.compile,
            eval_every=config.eval_every,
            eval_batches=config.eval_batches, save_every=0, keep_last=1, seed=config.seed, log_every=10)
        result = pretrain.run(pre)

    with _stage(timings, "sample"):
        model = Transformer.from_pretrained(result.last_checkpoint, dtype=torch.float32)
        samples = sample(model, tokenizer, config)
    timings["total"] = round(time.perf_counter() - t0, 1)

    history = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    plot_training_curves(history, run / "loss.png", title=config.name)
    summary = _summary(config, model, data_report, metas, tokenizer, history, result, timed, precision, timings,
                       samples)
    atomic_write_json(run / "report.json", summary)
    atomic_write_text(run / "report.md", render_report(summary))
    print(f"[speedrun] validation {summary['final']['val_bpb']:.3f} bits/byte, loss "
          f"{summary['final']['val_loss']:.3f}; report: {run / 'report.md'}", flush=True)
    return run


def sample(model: Transformer, tokenizer: Tokenizer, config: SpeedrunConfig) -> list[dict]:
    from llmkit.generate import generate

    out = []
    for prompt in DEFAULT_PROMPTS:
        greedy = generate(model, tokenizer, prompt, max_new_tokens=config.sample_tokens, temperature=0.0)
        sampled = generate(model, tokenizer, prompt, max_new_tokens=config.sample_tokens, temperature=0.8,
                           top_k=50, seed=config.seed)
        out.append({"prompt": prompt, "greedy": greedy.text, "sampled (T=0.8, top-k 50)": sampled.text})
    return out


def _summary(config, model, data_report, metas, tokenizer, history, result, timed, precision, timings,
             samples) -> dict:
    train = [r for r in history if "loss" in r]
    val = [r for r in history if "val_loss" in r]
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r][1:]  # the first window includes start-up
    mfus = [r["mfu"] for r in train if "mfu" in r][1:]
    return {
        "config": dataclasses.asdict(config),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "data": {"sources": data_report["sources"], "split": data_report["split"],
                 "train_tokens": metas["train"]["tokens"], "val_tokens": metas.get("val", {}).get("tokens", 0)},
        "tokenizer": {"vocab_size": tokenizer.vocab_size,
                      "bytes_per_token": data_report["split"]["train_chars"] / max(1, metas["train"]["tokens"])},
        "model": {"preset": config.model, "parameters": model.num_parameters(),
                  "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
                  "config": model.config.to_dict(), "flops_per_token": model.flops_per_token(config.context)},
        "training": {"steps": result.step, "stopped": result.stopped, "tokens_seen": train[-1]["tokens_seen"],
                     "epochs": train[-1]["tokens_seen"] / max(1, metas["train"]["tokens"]),
                     "precision": precision,
                     "calibrated_seconds_per_step": {p: round(t, 4) for p, t in timed.items()},
                     "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
                     "mfu": round(sum(mfus) / len(mfus), 4) if mfus else None,
                     "energy": result.energy},
        "final": {"train_loss": train[-1]["loss"], "val_loss": val[-1]["val_loss"] if val else None,
                  "val_ppl": val[-1]["val_ppl"] if val else None, "val_bpb": val[-1].get("val_bpb") if val else None},
        "expert_load": (result.report or {}).get("expert_load"),  # a mixture of experts: the load band
        "timings_s": timings,
        "samples": samples,
        "checkpoint": str(result.last_checkpoint),
    }


def _measured(value) -> str:
    """A throughput reading; the first log window includes start-up and compiling, so a run too short
    for a second window has none."""
    return "not measured (the run ended within its first log window)" if value is None else str(value)


def _expert_lines(s: dict) -> list[str]:
    """A mixture of experts: how evenly the routers spread the tokens, and the utilisation plot."""
    band, c = s.get("expert_load"), s["model"]["config"]
    if not band:
        return []
    return [f"{c['n_experts']} experts, {c['experts_per_token']} per token: over the last {band['steps_averaged']} "
            f"steps each expert received {band['min_load']:.2f}-{band['max_load']:.2f} x its even share of tokens "
            f"(in one step, per layer: the idlest {band['step_min_load']:.2f} x, the busiest "
            f"{band['step_max_load']:.2f} x).",
            "", "![expert utilisation](train/expert_load.png)", ""]


def render_report(s: dict) -> str:
    c, t, f, m = s["config"], s["training"], s["final"], s["model"]
    lines = [
        f"# Speedrun: {c['name']}", "",
        f"Budget {c['budget_minutes']} min on {s['machine']['cpu']} ({s['machine']['threads']} threads, torch "
        f"{s['machine']['torch']}); total wall clock {s['timings_s']['total']} s.", "",
        "## Result", "",
        "| metric | value |", "|---|---|",
        f"| validation loss (nats/token) | {f['val_loss']:.4f} |",
        f"| validation perplexity | {f['val_ppl']:.2f} |",
        f"| validation bits per byte | {f['val_bpb']:.4f} |",
        f"| final training loss | {f['train_loss']:.4f} |",
        f"| steps | {t['steps']} ({t['stopped']}) |",
        f"| tokens seen | {t['tokens_seen']:,} ({t['epochs']:.2f} epochs) |",
        f"| training tokens/s | {_measured(t['tokens_per_s'])} ({t['precision']}) |",
        f"| MFU (vs measured matmul peak) | {_measured(t['mfu'])} |",
        *([f"| training energy | {t['energy']['joules']:.0f} J, {t['energy']['co2_grams']:.3f} g CO2 at "
           f"{t['energy']['grid_gco2_per_kwh']:g} g/kWh ({t['energy']['method']}) |"] if t.get("energy") else []),
        "",
        "![loss curves](loss.png)", "",
        "## Data", "",
        "| source | package | weight | license |", "|---|---|---|---|",
        *[f"| {n} | {v['requirement']} | {v['weight']} | {v['license']} |" for n, v in s["data"]["sources"].items()],
        "",
        f"Train: {s['data']['split']['train_documents']:,} documents, {s['data']['split']['train_chars']:,} characters, "
        f"{s['data']['train_tokens']:,} tokens; validation: {s['data']['split']['val_documents']:,} documents, "
        f"{s['data']['val_tokens']:,} tokens. Cleaning, dedup and mixture: [data/report.md](data/report.md).", "",
        f"Tokenizer: byte-level BPE, {s['tokenizer']['vocab_size']:,} tokens, "
        f"{s['tokenizer']['bytes_per_token']:.2f} characters per token on the training text.", "",
        "## Model", "",
        f"Preset `{m['preset']}`: {m['parameters']:,} parameters ({m['non_embedding_parameters']:,} non-embedding), "
        f"{human(m['flops_per_token'])} training FLOPs per token at context {c['context']}.", "",
        *_expert_lines(s),
        "```json", json.dumps(m["config"], indent=1), "```", "",
        "## Run configuration", "",
        "```json", json.dumps(c, indent=1), "```", "",
        "## Samples", "",
    ]
    for smp in s["samples"]:
        for kind, text in smp.items():
            if kind != "prompt":
                lines += [f"**{kind}** — *{smp['prompt']}*{text}", ""]
    lines += ["## Timings (s)", "", "| stage | seconds |", "|---|---|",
              *[f"| {k} | {v} |" for k, v in s["timings_s"].items()], ""]
    if not math.isfinite(f["val_loss"] or 0.0):
        lines.append("**Warning: the validation loss is not finite.**")
    return "\n".join(lines) + "\n"
