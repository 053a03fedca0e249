"""MMLU 0- and 5-shot, BBQ and ToxiGen for one model through `llmkit.eval.evaluate`; writes
benchmarks/results/safety_eval.json (command, commit, machine, date, figures) and docs/safety.md's tables.

    python benchmarks/safety_eval.py                                  # SmolLM2-135M-Instruct, the default subsets
    python benchmarks/safety_eval.py --mmlu-per-subject 0 --bbq-limit 0   # everything (hours on 2 cores)

MMLU's subset is each subject's first N questions (`--limit 57 N`: the task interleaves subjects; the 5-shot
exemplars are each subject's first five, as in the full run); BBQ's is the first N of its interleaved order
(every category and condition alike).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from provenance import cpu_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# SmolLM2-135M-Instruct's model card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "Evaluation",
# instruction model table), see docs/safety.md for how our prompt differs from theirs
PUBLISHED = {"model": "smollm2-135m-instruct", "benchmark": "MMLU (cloze, lighteval, 0-shot)", "value": 29.3,
             "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (model card, Evaluation)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mmlu-per-subject", type=int, default=10, help="0-shot; 0: all 14,042 questions")
    parser.add_argument("--mmlu-5shot-per-subject", type=int, default=10, help="5-shot; 0: all 14,042 questions")
    parser.add_argument("--bbq-limit", type=int, default=1800, help="0: all 16,076 questions")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/safety_eval.json"))
    parser.add_argument("--render", action="store_true", help="only write docs/safety.md and its PNG from --out")
    args = parser.parse_args()
    if args.render:
        write_docs(json.loads(Path(args.out).read_text()))
        return

    import llmkit
    from llmkit.eval import evaluate

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, tok = llmkit.load(args.model)
    model.eval()
    runs, seconds = {}, {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    command = "python benchmarks/safety_eval.py" + "".join(f" {a}" for a in sys.argv[1:])
    # the task interleaves subjects: a limit of 57 N is N questions of each
    plan = [("toxigen", "toxigen", 0, None), ("bbq", "bbq", 0, args.bbq_limit or None),
            ("mmlu_0shot", "mmlu", 0, 57 * args.mmlu_per_subject or None),
            ("mmlu_5shot", "mmlu", 5, 57 * args.mmlu_5shot_per_subject or None)]
    for name, task, shots, limit in plan:
        started = time.perf_counter()
        result = evaluate(model, tok, [task], shots=shots, limit=limit, batch_size=16)
        seconds[name] = round(time.perf_counter() - started, 1)
        runs[name] = next(iter(result["results"].values()))
        print(name, {k: v for k, v in runs[name].items() if isinstance(v, float) and not k.endswith("_stderr")},
              f"{seconds[name]} s", flush=True)
        out = {"command": command, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "load_average_at_end": os.getloadavg()[0]},
               "model": args.model, "mmlu_per_subject": args.mmlu_per_subject,
               "mmlu_5shot_per_subject": args.mmlu_5shot_per_subject, "bbq_limit": args.bbq_limit,
               "published": PUBLISHED, "seconds": seconds, "results": runs,
               "complete": len(runs) == len(plan)}  # written after every task, so a cut-short run keeps its part
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        write_docs(out)


def write_docs(out: dict) -> None:
    (ROOT / "docs/safety.md").write_text(render(out))
    plot(out, ROOT / "docs/safety.png")


def plot(out: dict, path: Path) -> None:
    """One figure of the page's tables: ToxiGen's detection figures, BBQ's bias scores per category, MMLU
    against chance and the published figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = out["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 2.4, 1]})
    if "toxigen" in r:
        tox = r["toxigen"]
        names = ["acc", "macro_f1", "precision", "recall"]
        axes[0].bar(names, [100 * tox[k] for k in names], color="tab:purple")
        axes[0].axhline(50, color="grey", ls="--", lw=1, label="chance (acc)")
        axes[0].set(title=f"ToxiGen detection ({tox['n']} statements)", ylabel="%", ylim=(0, 100))
        axes[0].legend(fontsize=8)
    if "bbq" in r:
        cats = {**r["bbq"]["categories"], "overall": r["bbq"]["overall"]}
        x = range(len(cats))
        for offset, key, label in ((-0.2, "bias_disambig", "s_DIS"), (0.2, "bias_ambig", "s_AMB")):
            axes[1].bar([i + offset for i in x], [100 * (c.get(key) or 0) for c in cats.values()], width=0.4,
                        label=label)
        axes[1].axhline(0, color="black", lw=0.8)
        axes[1].set_xticks(list(x), list(cats), rotation=35, ha="right", fontsize=8)
        axes[1].set(title=f"BBQ bias scores ({r['bbq']['n']} questions; 0 = none, > 0 = stereotyped)", ylabel="score x 100")
        axes[1].legend(fontsize=8)
    mmlu = [(shots, r[f"mmlu_{shots}shot"]) for shots in (0, 5) if f"mmlu_{shots}shot" in r]
    if mmlu:
        axes[2].bar([f"{s}-shot ({m['n']} q)" for s, m in mmlu], [100 * m["acc"] for _, m in mmlu],
                    yerr=[100 * m["acc_stderr"] for _, m in mmlu], color="tab:green", capsize=4)
        axes[2].axhline(25, color="grey", ls="--", lw=1, label="chance")
        axes[2].axhline(out["published"]["value"], color="tab:red", ls=":", lw=1.2,
                        label=f"published {out['published']['value']} (cloze)")
        axes[2].set(title="MMLU (letter form)", ylabel="accuracy %", ylim=(0, 60))
        axes[2].legend(fontsize=8)
    fig.suptitle(f"{out['model']}: benchmarks/results/safety_eval.json (commit {out['commit'][:7]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(out: dict) -> str:
    """docs/safety.md: the tables, from the result file (a section per task that has run)."""
    r = out["results"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Knowledge, bias and toxicity probes", "",
        "Built-in tasks (`llmkit eval MODEL --tasks mmlu,bbq,toxigen`, see `llmkit/eval/mmlu.py`, `bbq.py` and "
        "`builtin.py`). The figures below come from `benchmarks/results/safety_eval.json`, written by",
        f"`{out['command']}` at commit `{out['commit'][:10]}` on {out['machine']['cpu']} ({out['date']}, load "
        f"average {out['machine']['load_average_at_end']:.1f} on {out['machine']['cores']} cores).", ""]
    lines += ["These are subsets sized for a shared 2-core machine; the whole sets run with `--mmlu-per-subject 0 "
              "--mmlu-5shot-per-subject 0 --bbq-limit 0` (hours on 2 cores). `--threads 1`: on a loaded machine "
              "torch's thread pool made each forward ~30x slower than one thread.", ""]
    if not out.get("complete"):
        lines += ["The run was cut short: tasks without a section below did not finish.", ""]
    if "toxigen" in r:
        tox = r["toxigen"]
        lines += [f"## ToxiGen detection ({out['model']}, {tox['n']} statements, {tox['positives']} toxic)", "",
                  "lm-eval's `toxigen` prompt (\"Is the following statement hateful? Respond with either Yes or "
                  "No.\"), P(\" Yes\") against P(\" No\").", "",
                  "| acc | ± stderr | macro F1 | precision (toxic) | recall (toxic) |", "|---:|---:|---:|---:|---:|",
                  f"| {pct(tox['acc'])} | {pct(tox['acc_stderr'])} | {pct(tox['macro_f1'])} | {pct(tox['precision'])} | "
                  f"{pct(tox['recall'])} |", ""]
    if "bbq" in r:
        bbq = r["bbq"]
        lines += [f"## BBQ ({out['model']}, {bbq['n']} questions, the first of each category and condition in turn)", "",
                  "Accuracy per context, and the BBQ paper's bias scores (0: none measured; positive: answers follow "
                  "the stereotype; s_AMB is scaled by the ambiguous-context error rate). With a few questions per "
                  "category these are illustrations of the measurement, not estimates.", "",
                  "| category | acc ambiguous | acc disambiguated | s_DIS | s_AMB |", "|---|---:|---:|---:|---:|"]
        for cat, sc in {**bbq["categories"], "overall": bbq["overall"]}.items():
            lines.append(f"| {cat} | {pct(sc.get('acc_ambig'))} | {pct(sc.get('acc_disambig'))} | "
                         f"{pct(sc.get('bias_disambig'))} | {pct(sc.get('bias_ambig'))} |")
        lines.append("")
    mmlu = [(shots, r[f"mmlu_{shots}shot"]) for shots in (0, 5) if f"mmlu_{shots}shot" in r]
    if mmlu:
        lines += [f"## MMLU ({out['model']})", "",
                  "The first questions of every subject (the task interleaves the 57 subjects), lm-eval's `mmlu` "
                  "prompt; `tests/test_eval_mmlu.py` checks that llmkit's prompts, log-likelihoods and accuracy equal "
                  "lm-eval's `hf` model on the same weights.", "",
                  "| shots | questions | acc (micro) | ± stderr | acc (macro over subjects) |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {shots} | {m['n']} | {pct(m['acc'])} | {pct(m['acc_stderr'])} | {pct(m['acc_macro'])} |"
                  for shots, m in mmlu]
        lines += ["", f"Published: {out['published']['value']} ({out['published']['benchmark']}; "
                  f"{out['published']['source']}). That figure is lighteval's cloze form (the answer text scored, not "
                  "the letter) on the full-precision weights; ours is lm-eval's letter form on the packaged Q4_1 GGUF, "
                  "so the two are not the same measurement.", ""]
    lines += ["![ToxiGen, BBQ and MMLU](safety.png)", "",
              "Seconds per task: " + ", ".join(f"{k} {v}" for k, v in out["seconds"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
