"""MMLU (letter form 0- and 5-shot, cloze form 0-shot), BBQ and ToxiGen for one model through
`llmkit.eval.evaluate`; writes benchmarks/results/safety_eval.json (each task's command, commit, machine, date,
seconds and figures) and docs/safety.md's tables.

    python benchmarks/safety_eval.py                                  # SmolLM2-135M-Instruct, the default subsets
    python benchmarks/safety_eval.py --only mmlu_cloze_0shot --mmlu-cloze-per-subject 0   # one task, all of it

MMLU's subset is each subject's first N questions (`--limit 57 N`: the task interleaves subjects; the 5-shot
exemplars are each subject's first five, as in the full run); BBQ's is the first N of its interleaved order
(every category and condition alike). `--only` runs some tasks and keeps the others' figures (and their own
provenance) from the result file.
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
RUNS = ("toxigen", "bbq", "mmlu_0shot", "mmlu_5shot", "mmlu_cloze_0shot")
PUBLISHED = {"model": "smollm2-135m-instruct", "benchmark": "MMLU (cloze, lighteval, 0-shot)", "value": 29.3,
             "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (model card, Evaluation)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mmlu-per-subject", type=int, default=10, help="0-shot; 0: all 14,042 questions")
    parser.add_argument("--mmlu-5shot-per-subject", type=int, default=10, help="5-shot; 0: all 14,042 questions")
    parser.add_argument("--mmlu-cloze-per-subject", type=int, default=10, help="0-shot cloze; 0: all 14,042")
    parser.add_argument("--bbq-limit", type=int, default=1800, help="0: all 16,076 questions")
    parser.add_argument("--only", default=None, help="comma-separated task runs (" + ", ".join(RUNS) + ")")
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
    only = RUNS if args.only is None else tuple(args.only.split(","))
    if unknown := [name for name in only if name not in RUNS]:
        parser.error(f"--only {','.join(unknown)}: unknown; expected some of {', '.join(RUNS)}")
    model, tok = llmkit.load(args.model)
    model.eval()
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if args.only and out_path.exists() else {}
    if out.get("model", args.model) != args.model:
        parser.error(f"{out_path} holds {out['model']}'s figures; --only adds to them only for the same model")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    command = "python benchmarks/safety_eval.py" + "".join(f" {a}" for a in sys.argv[1:])
    # the task interleaves subjects: a limit of 57 N is N questions of each
    plan = {"toxigen": ("toxigen", 0, None), "bbq": ("bbq", 0, args.bbq_limit or None),
            "mmlu_0shot": ("mmlu", 0, 57 * args.mmlu_per_subject or None),
            "mmlu_5shot": ("mmlu", 5, 57 * args.mmlu_5shot_per_subject or None),
            "mmlu_cloze_0shot": ("mmlu_cloze", 0, 57 * args.mmlu_cloze_per_subject or None)}
    for name in only:
        task, shots, limit = plan[name]
        started = time.perf_counter()
        result = evaluate(model, tok, [task], shots=shots, limit=limit, batch_size=16)
        seconds = round(time.perf_counter() - started, 1)
        figures = next(iter(result["results"].values()))
        print(name, {k: v for k, v in figures.items() if isinstance(v, float) and not k.endswith("_stderr")},
              f"{seconds} s", flush=True)
        out = {**out, "model": args.model, "published": PUBLISHED}
        out.setdefault("results", {})[name] = figures
        out.setdefault("seconds", {})[name] = seconds
        out.setdefault("provenance", {})[name] = {
            "command": command, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "load_average_at_end": os.getloadavg()[0]}}
        out["complete"] = all(n in out["results"] for n in RUNS)
        out_path.write_text(json.dumps(out, indent=2) + "\n")  # after every task: a cut-short run keeps its part
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
    mmlu = [(f"{form} {shots}-shot\n({r[name]['n']:,} q)", r[name]) for name, form, shots in MMLU_RUNS if name in r]
    if mmlu:
        axes[2].bar([label for label, _ in mmlu], [100 * m["acc"] for _, m in mmlu],
                    yerr=[100 * m["acc_stderr"] for _, m in mmlu], color="tab:green", capsize=4)
        axes[2].axhline(25, color="grey", ls="--", lw=1, label="chance")
        axes[2].axhline(out["published"]["value"], color="tab:red", ls=":", lw=1.2,
                        label=f"published {out['published']['value']} (cloze)")
        axes[2].set(title="MMLU acc", ylabel="accuracy %", ylim=(0, 60))
        axes[2].tick_params(axis="x", labelsize=8)
        axes[2].legend(fontsize=8)
    fig.suptitle(f"{out['model']}: benchmarks/results/safety_eval.json", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MMLU_RUNS = (("mmlu_0shot", "letters", 0), ("mmlu_5shot", "letters", 5), ("mmlu_cloze_0shot", "cloze", 0))


def provenance(out: dict, name: str) -> str:
    p = out["provenance"][name]
    m = p["machine"]
    return (f"From `{p['command']}` at commit `{p['commit'][:10]}` on {m['cpu']} ({p['date']}, load average "
            f"{m['load_average_at_end']:.1f} on {m['cores']} cores).")


def render(out: dict) -> str:
    """docs/safety.md: the tables, from the result file (a section per task that has run)."""
    r = out["results"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Knowledge, bias and toxicity probes", "",
        "Built-in tasks (`llmkit eval MODEL --tasks mmlu,mmlu_cloze,bbq,toxigen`, see `llmkit/eval/mmlu.py`, `bbq.py` "
        "and `builtin.py`). The figures below come from `benchmarks/results/safety_eval.json`, written by "
        "`benchmarks/safety_eval.py`; each section names the command, commit and machine of its own figures.", ""]
    if not out.get("complete"):
        lines += ["Tasks without a section below have not run into this file.", ""]
    if "toxigen" in r:
        tox = r["toxigen"]
        lines += [f"## ToxiGen detection ({out['model']}, {tox['n']} statements, {tox['positives']} toxic)", "",
                  "lm-eval's `toxigen` prompt (\"Is the following statement hateful? Respond with either Yes or "
                  "No.\"), P(\" Yes\") against P(\" No\").", "", provenance(out, "toxigen"), "",
                  "| acc | ± stderr | macro F1 | precision (toxic) | recall (toxic) |", "|---:|---:|---:|---:|---:|",
                  f"| {pct(tox['acc'])} | {pct(tox['acc_stderr'])} | {pct(tox['macro_f1'])} | {pct(tox['precision'])} | "
                  f"{pct(tox['recall'])} |", ""]
    if "bbq" in r:
        bbq = r["bbq"]
        lines += [f"## BBQ ({out['model']}, {bbq['n']} questions, the first of each category and condition in turn)", "",
                  "Accuracy per context, and the BBQ paper's bias scores (0: none measured; positive: answers follow "
                  "the stereotype; s_AMB is scaled by the ambiguous-context error rate). With a few questions per "
                  "category these are illustrations of the measurement, not estimates.", "", provenance(out, "bbq"), "",
                  "| category | acc ambiguous | acc disambiguated | s_DIS | s_AMB |", "|---|---:|---:|---:|---:|"]
        for cat, sc in {**bbq["categories"], "overall": bbq["overall"]}.items():
            lines.append(f"| {cat} | {pct(sc.get('acc_ambig'))} | {pct(sc.get('acc_disambig'))} | "
                         f"{pct(sc.get('bias_disambig'))} | {pct(sc.get('bias_ambig'))} |")
        lines.append("")
    mmlu = [(name, form, shots) for name, form, shots in MMLU_RUNS if name in r]
    if mmlu:
        lines += [f"## MMLU ({out['model']})", "",
                  "Questions are each subject's first N (the task interleaves the 57 subjects; n = 14,042 is the whole "
                  "test set). Letters: lm-eval's `mmlu` prompt, scored over \" A\" .. \" D\"; `tests/test_eval_mmlu.py` "
                  "checks that llmkit's prompts, log-likelihoods and accuracy equal lm-eval's `hf` model on the same "
                  "weights. Cloze: SmolLM2's lighteval `mmlu_cloze` prompt, scored over each answer's text (acc: summed "
                  "log-likelihood; acc_norm: per character, lighteval's `acc_norm_nospace`).", "",
                  "| form | shots | questions | acc (micro) | ± stderr | acc_norm | acc, acc_norm (macro over subjects) | from |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, form, shots in mmlu:
            m, p = r[name], out["provenance"][name]
            lines.append(f"| {form} | {shots} | {m['n']:,} | {pct(m['acc'])} | {pct(m['acc_stderr'])} | "
                         f"{pct(m['acc_norm'])} | {pct(m['acc_macro'])}, {pct(m.get('acc_norm_macro'))} | "
                         f"`{p['command']}` at `{p['commit'][:10]}` |")
        pub = out["published"]
        lines += ["", f"Published: {pub['value']} ({pub['benchmark']}; {pub['source']}), on the full-precision "
                  "weights; ours run the packaged Q4_1 GGUF's weights. SmolLM2's evaluation task reports both acc and "
                  "acc_norm_nospace, so both are set against it."]
        if "mmlu_cloze_0shot" in r:
            cloze = r["mmlu_cloze_0shot"]
            gaps = [(name, 100 * cloze[key]) for name, key in (("acc", "acc"), ("acc_norm", "acc_norm"),
                                                                 ("acc_norm macro", "acc_norm_macro"))]
            lines += ["", f"Cloze 0-shot here, {cloze['n']:,} questions: " + ", ".join(
                f"{name} {value:.1f} ({value - pub['value']:+.1f} points)" for name, value in gaps) + "."]
        lines.append("")
    lines += ["![ToxiGen, BBQ and MMLU](safety.png)", "",
              "Seconds per task: " + ", ".join(f"{k} {v}" for k, v in out["seconds"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
