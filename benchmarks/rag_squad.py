"""Closed-book vs retrieval-augmented answers on SQuAD v1.1 dev, with the gold passages hidden among
the Wikipedia leads and the other SQuAD paragraphs; writes benchmarks/results/rag_squad.json and
docs/rag_squad.png.

    python benchmarks/rag_squad.py                          # 500 questions, every passage (~12k) indexed
    python benchmarks/rag_squad.py --questions 20 --wikipedia 500 --out /tmp/rag_smoke.json   # a smoke run

Measured:
- retrieval recall@5 of the question's own paragraph for BM25, dense (all-MiniLM-L6-v2) and hybrid (RRF);
- exact match and F1 (SQuAD's normalisation, best over the reference answers) of SmolLM2-135M-Instruct's
  greedy answer, closed-book (the question alone) and with the top-k hybrid passages in the prompt;
- hallucination share: an answer is *unsupported* when, for every one of the top-5 hybrid passages of
  its question, fewer than half of its SQuAD-normalised tokens occur in that passage (citation marks
  removed first); the same passages judge the closed-book and the RAG answers. Empty answers are counted
  apart (`empty`), neither supported nor not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import cpu_name  # noqa: E402
from llmkit.eval.tasks import normalize, token_f1  # noqa: E402
from llmkit.files import atomic_write_json, cache_dir  # noqa: E402
from llmkit.generate.api import generate  # noqa: E402
from llmkit.generate.chat import end_of_turn_ids, load  # noqa: E402
from llmkit.rag import corpus, index  # noqa: E402
from llmkit.rag.ask import grounded_messages, numbered  # noqa: E402

CLOSED = "Answer the question with a short phrase."
GROUNDED = ("Answer the question with a short phrase taken from the numbered passages below, then cite the "
            "passage you used like [1].")
SUPPORT = 0.5  # share of an answer's tokens that must occur in one retrieved passage for it to count as supported



def questions(n: int, seed: int = 0) -> list[dict]:
    """n questions, one per SQuAD dev paragraph, from paragraphs drawn with a seeded shuffle."""
    paragraphs = [(a, p, para) for a, art in enumerate(corpus.squad_articles()) for p, para in enumerate(art["paragraphs"])]
    chosen = random.Random(seed).sample(paragraphs, n)
    return [{"question": para["qas"][0]["question"], "answers": [x["text"] for x in para["qas"][0]["answers"]],
             "gold": corpus.squad_passage_id(a, p)} for a, p, para in chosen]


def build_index(n_wikipedia: int | None) -> index.Index:
    """The Wikipedia leads (first n, windows of 200 words) and every SQuAD dev paragraph; cached."""
    folder = cache_dir() / "benchmarks" / f"rag_squad_index_{n_wikipedia or 'all'}"
    if (folder / "manifest.json").is_file():
        return index.Index.load(folder)
    passages = corpus.passages("wikipedia")[:n_wikipedia] + corpus.passages("squad")
    built = index.build(passages, corpora=["wikipedia", "squad"])
    built.save(folder)
    return built


def answer_text(text: str) -> str:
    return re.sub(r"\[\d+\]", " ", text).strip()


def scores(answer: str, references: list[str]) -> tuple[float, float]:
    em = max(float(normalize(answer, "squad") == normalize(r, "squad")) for r in references)
    return em, max(token_f1(answer, r) for r in references)


def support(answer: str, passages: list[dict]) -> float | None:
    """The largest share of the answer's normalised tokens found in one passage; None for an empty answer."""
    tokens = normalize(answer, "squad").split()
    if not tokens:
        return None
    return max(sum(t in set(normalize(p["text"], "squad").split()) for t in tokens) / len(tokens) for p in passages)


def generate_all(model, tokenizer, chats: list[list[dict]], max_new_tokens: int, batch: int) -> list[str]:
    from tqdm import tqdm

    prompts = [tokenizer.encode(tokenizer.render_chat(c, add_generation_prompt=True), add_special_tokens=False)
               for c in chats]
    stops = end_of_turn_ids(tokenizer)
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc="answers", unit="batch"):
        got = generate(model, tokenizer, prompts[start:start + batch], max_new_tokens=max_new_tokens,
                       temperature=0.0, stop_token_ids=stops)
        out += [c.text for c in (got if isinstance(got, list) else [got])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=500)
    ap.add_argument("--wikipedia", type=int, default=None, help="first N Wikipedia passages (default: all)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--k", type=int, default=3, help="passages in the RAG prompt")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rag_squad.json"))
    ap.add_argument("--png", default=str(ROOT / "docs/rag_squad.png"))
    args = ap.parse_args()
    started = time.time()
    qs = questions(args.questions)
    built = build_index(args.wikipedia)
    texts = [q["question"] for q in qs]
    recall = {}
    hits = {}
    for mode in index.MODES:
        hits[mode] = built.search_many(texts, 5, mode)
        recall[mode] = sum(q["gold"] in [h.passage["id"] for h in row] for q, row in zip(qs, hits[mode], strict=True)) / len(qs)
    print("recall@5", recall, flush=True)
    model, tokenizer = load(args.model)
    closed = generate_all(model, tokenizer, [[{"role": "user", "content": f"{CLOSED}\n\nQuestion: {q['question']}"}]
                                             for q in qs], args.max_new_tokens, args.batch)
    shown = [numbered(row[:args.k]) for row in hits["hybrid"]]
    rag = generate_all(model, tokenizer, [grounded_messages(q["question"], s, instruction=GROUNDED)
                                          for q, s in zip(qs, shown, strict=True)], args.max_new_tokens, args.batch)
    rows, summary = [], {}
    for name, answers in (("closed_book", closed), ("rag", rag)):
        ems, f1s, unsupported, empty = [], [], 0, 0
        for q, a, row in zip(qs, answers, hits["hybrid"], strict=True):
            text = answer_text(a)
            em, f1 = scores(text, q["answers"])
            ems.append(em)
            f1s.append(f1)
            s = support(text, [h.passage for h in row])
            empty += s is None
            unsupported += s is not None and s < SUPPORT
        answered = len(qs) - empty
        summary[name] = {"exact_match": sum(ems) / len(qs), "f1": sum(f1s) / len(qs),
                         "unsupported_share": unsupported / answered if answered else 0.0, "empty": empty}
    for q, c, r, s in zip(qs, closed, rag, shown, strict=True):
        rows.append({**q, "closed_book": c, "rag": r, "shown": [p["id"] for p in s]})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"command": "python benchmarks/rag_squad.py " + " ".join(sys.argv[1:]), "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_end": os.getloadavg()[0]},
              "model": args.model, "questions": len(qs), "indexed_passages": len(built),
              "distractors": len(built) - len(qs), "k_in_prompt": args.k, "max_new_tokens": args.max_new_tokens,
              "support_threshold": SUPPORT, "recall_at_5": recall, **summary,
              "seconds": round(time.time() - started, 1), "examples": rows[:20]}
    atomic_write_json(args.out, result)
    plot(result, args.png)
    print(json.dumps({k: result[k] for k in ("recall_at_5", "closed_book", "rag", "seconds")}, indent=2))


def plot(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    modes = list(result["recall_at_5"])
    axes[0].bar(modes, [result["recall_at_5"][m] for m in modes], color=["#888", "#4a90d9", "#2a6"])
    axes[0].set_title("recall@5 of the gold passage")
    for ax, metrics, title in ((axes[1], ("exact_match", "f1"), "answer quality"),
                               (axes[2], ("unsupported_share",), "unsupported answers (share)")):
        width = 0.38
        for i, name in enumerate(("closed_book", "rag")):
            ax.bar([j + i * width for j in range(len(metrics))], [result[name][m] for m in metrics], width,
                   label=name.replace("_", "-"))
        ax.set_xticks([j + width / 2 for j in range(len(metrics))], metrics)
        ax.set_title(title)
        ax.legend()
    for ax in axes:
        ax.set_ylim(0, 1)
    fig.suptitle(f"{result['model']}: {result['questions']} SQuAD dev questions, {result['indexed_passages']} "
                 "passages indexed")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
