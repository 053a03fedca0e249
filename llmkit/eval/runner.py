"""`evaluate(model, tokenizer, tasks, shots, limit)`: score tasks, and write the run's report.

Each task becomes a batch of requests (log-likelihoods for choices, greedy generations for answers,
programs for the sandbox), scored with the task's metrics; `write_report` turns the result into
`results.json`, `samples/<task>.jsonl` (every prompt, output and score), `report.md` and `results.png`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llmkit.analysis.energy import EnergyMeter, render_energy
from llmkit.errors import ConfigError
from llmkit.eval import tasks as T
from llmkit.eval.lm import generate_until, loglikelihood
from llmkit.progress import phase

CODE_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "```")  # HumanEval's (Chen et al.) + a closing fence


def evaluate(model, tokenizer, tasks, shots: int = 0, limit: int | None = None, *, chat: bool = False,
             cot: bool = False, seed: int = 1234, batch_size: int = 16, progress: bool = True,
             timeout: float = 10.0) -> dict:
    """Metrics of `tasks` (names, task files or `Task`s) for one model; see `llmkit.eval.tasks`.

    Returns {"results": {task: {metric: value, metric_stderr: value, ...}}, "samples": {task: [...]},
    "config": {...}}; `limit` keeps each task's first N docs (else the task's default size).
    """
    if isinstance(tasks, (str, os.PathLike, T.Task)):
        tasks = [tasks]
    if shots < 0:
        raise ConfigError(f"shots={shots} is invalid; expected an integer >= 0")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} is invalid; expected an integer >= 1 (or none for every doc)")
    resolved = [t if isinstance(t, T.Task) else T.get_task(os.fspath(t)) for t in tasks]
    for task in resolved:
        if task.max_shots is not None and shots > task.max_shots:
            raise ConfigError(f"task {task.name!r} takes at most {task.max_shots} shots, got shots={shots}")
    results, samples, timings = {}, {}, {}
    meter = EnergyMeter().start()
    for task in resolved:
        start = time.perf_counter()
        docs = task.load()
        n = limit if limit is not None else task.default_limit
        docs = docs[:n] if n else docs
        if task.prepare is not None:
            docs = [task.prepare(d) for d in docs]
        pool = task.fewshot_pool() if task.fewshot_pool else task.load()
        prompts = [T.build_prompt(task, d, T.exemplars(task, pool, i, d, shots, seed), tokenizer, chat, cot)
                   for i, d in enumerate(docs)]
        score = _SCORERS[task.kind]
        metrics, rows = score(model, tokenizer, task, docs, prompts, chat=chat, cot=cot, batch_size=batch_size,
                              progress=progress, timeout=timeout, seed=seed)
        if task.aggregate is not None:
            metrics |= task.aggregate(docs, rows)
        results[task.name] = {"kind": task.kind, "n": len(docs), "shots": shots, **metrics}
        samples[task.name] = rows
        timings[task.name] = round(time.perf_counter() - start, 2)
    return {"results": results, "samples": samples, "energy": meter.result(),
            "config": {"shots": shots, "limit": limit, "chat": chat, "cot": cot, "seed": seed,
                       "batch_size": batch_size, "seconds": timings,
                       "sources": {t.name: t.source for t in resolved if t.source}}}


def _summarize(per_doc: dict[str, list[float]]) -> dict:
    out = {}
    for name, values in per_doc.items():
        out[name], out[f"{name}_stderr"] = T.mean_and_stderr(values)
    return out


def _score_choices(model, tokenizer, task, docs, prompts, *, chat, batch_size, progress, **_):
    delimiter = "" if chat else task.target_delimiter
    requests = [(p, delimiter + c) for p, d in zip(prompts, docs, strict=True) for c in d["choices"]]
    lls = loglikelihood(model, tokenizer, requests, batch_size, progress, desc=task.name)
    per_doc = {"acc": [], "acc_norm": [], "acc_bytes": []}
    rows, preds, golds, at = [], [], [], 0
    for prompt, doc in zip(prompts, docs, strict=True):
        choice_lls = [ll for ll, _ in lls[at:at + len(doc["choices"])]]
        at += len(doc["choices"])
        pred = max(range(len(choice_lls)), key=choice_lls.__getitem__)
        norm = max(range(len(choice_lls)), key=lambda i: choice_lls[i] / len(doc["choices"][i]))
        per_byte = max(range(len(choice_lls)), key=lambda i: choice_lls[i] / len(doc["choices"][i].encode()))
        gold = doc["gold"]
        per_doc["acc"].append(float(pred == gold))
        per_doc["acc_norm"].append(float(norm == gold))
        per_doc["acc_bytes"].append(float(per_byte == gold))
        preds.append(pred)
        golds.append(gold)
        rows.append({"prompt": prompt, "choices": doc["choices"], "loglikelihoods": choice_lls, "gold": gold,
                     "pred": pred, "pred_norm": norm})
    metrics = _summarize(per_doc)
    if task.kind == "classification":
        metrics = {"acc": metrics["acc"], "acc_stderr": metrics["acc_stderr"],
                   "macro_f1": T.macro_f1(golds, preds, len(docs[0]["choices"]))}
    return metrics, rows


def _generate(model, tokenizer, task, prompts, *, cot, batch_size, progress, until=None, samples=1, seed=0):
    until = task.until if until is None else until
    max_gen_toks = max(task.max_gen_toks, 256) if cot else task.max_gen_toks
    if cot:  # a worked solution spans paragraphs: stop at the next exemplar's question instead
        until = tuple(u for u in until if u.strip()) or ("\n\n\n",)
    return generate_until(model, tokenizer, prompts, until, max_gen_toks, batch_size, progress, task.name,
                          samples=samples, seed=seed)


def _score_generation(model, tokenizer, task, docs, prompts, *, cot, batch_size, progress, **_):
    outputs = _generate(model, tokenizer, task, prompts, cot=cot, batch_size=batch_size, progress=progress)
    per_doc = {"exact_match": []} | ({"f1": []} if task.normalize == "squad" else {})
    rows = []
    for prompt, doc, out in zip(prompts, docs, outputs, strict=True):
        answers = [doc["answer"]] if isinstance(doc["answer"], str) else doc["answer"]
        extracted = T.extract_answer(task.postprocess(out) if task.postprocess else out, task, cot)
        pred = T.normalize(extracted, task.normalize)
        em = float(any(pred == T.normalize(a, task.normalize) for a in answers))
        per_doc["exact_match"].append(em)
        if "f1" in per_doc:
            per_doc["f1"].append(max(T.token_f1(extracted, a) for a in answers))
        rows.append({"prompt": prompt, "output": out, "extracted": extracted, "answers": answers, "exact_match": em})
    return _summarize(per_doc), rows


def _score_summarization(model, tokenizer, task, docs, prompts, *, batch_size, progress, **_):
    from rouge_score import rouge_scorer

    outputs = _generate(model, tokenizer, task, prompts, cot=False, batch_size=batch_size, progress=progress)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_doc = {"rouge1": [], "rouge2": [], "rougeL": []}
    rows = []
    for prompt, doc, out in zip(prompts, docs, outputs, strict=True):
        reference = doc["answer"] if isinstance(doc["answer"], str) else doc["answer"][0]
        scores = scorer.score(reference, out.strip())
        for name in per_doc:
            per_doc[name].append(scores[name].fmeasure)
        rows.append({"prompt": prompt, "output": out, "reference": reference,
                     **{k: scores[k].fmeasure for k in per_doc}})
    return _summarize(per_doc), rows


def _score_code(model, tokenizer, task, docs, prompts, *, batch_size, progress, timeout, seed, **_):
    from llmkit.eval.sandbox import run_program

    n = task.samples
    outputs = _generate(model, tokenizer, task, prompts, cot=False, batch_size=batch_size, progress=progress,
                        until=CODE_STOPS, samples=n, seed=seed)
    ks = [k for k in (1, 10, 100) if k <= n]
    per_doc = {f"pass@{k}": [] for k in ks}
    rows = []
    for i, (prompt, doc) in enumerate(zip(prompts, docs, strict=True)):
        outcomes = []
        for completion in outputs[i * n:(i + 1) * n]:
            program = f"{doc['query']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
            outcomes.append(run_program(program, timeout=timeout))
        passed = sum(o.passed for o in outcomes)
        for k in ks:
            per_doc[f"pass@{k}"].append(T.pass_at_k(n, passed, k))
        rows.append({"task_id": doc.get("task_id"), "prompt": prompt,
                     "completions": outputs[i * n:(i + 1) * n], "results": [o.status for o in outcomes]})
    return _summarize(per_doc), rows


_SCORERS = {"multiple_choice": _score_choices, "classification": _score_choices,
            "generation": _score_generation, "summarization": _score_summarization, "code": _score_code}


def run_eval(model_name: str, tasks: list[str], shots: int = 0, limit: int | None = None, out: str = "runs/eval",
             quantize: str | None = None, threads: int | None = None, dtype: str = "auto", device: str | None = None,
             max_model_len: int | None = None, **options) -> dict:
    """`llmkit eval`: load the model (HF folder, .gguf or registry name; quantize, threads, dtype, device
    and max_model_len as every verb loads it), evaluate, write the report."""
    from llmkit.generate.chat import load

    for name in tasks:  # fail on a bad task name before paying for the model
        T.get_task(name)
    with phase(f"load {model_name}", options.get("progress", True)):
        model, tokenizer = load(model_name, quantize, threads, dtype=dtype, device=device,
                                max_model_len=max_model_len)
    model.eval()
    result = evaluate(model, tokenizer, tasks, shots, limit, **options)
    write_report(result, out, model_name)
    return result


# ---- the report -------------------------------------------------------------------------------------


MAIN_METRIC = {"multiple_choice": "acc", "classification": "acc", "generation": "exact_match",
               "summarization": "rougeL", "code": "pass@1"}


def results_table(runs: list[dict]) -> str:
    """A Markdown table: one row per (task, shots) with each metric and its standard error."""
    lines = ["| task | kind | shots | n | metric | value | ± stderr |", "|---|---|---:|---:|---|---:|---:|"]
    for run in runs:
        for name, r in run["results"].items():
            for metric, value in r.items():
                if metric in ("kind", "n", "shots") or metric.endswith("_stderr") or not isinstance(value, float):
                    continue  # breakdowns (a dict per subject or category) are in results.json
                err = r.get(f"{metric}_stderr")
                lines.append(f"| {name} | {r['kind']} | {r['shots']} | {r['n']} | {metric} | {value:.4f} | "
                             f"{'' if err is None else f'{err:.4f}'} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: str | Path, model_name: str = "") -> Path:
    """results.json, samples/<task>.jsonl, report.md (table + sources and licenses) and results.png."""
    import json

    from llmkit.analysis.plots import plot_task_scores
    from llmkit.data.sources import SOURCES
    from llmkit.files import atomic_write_json, atomic_write_text

    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for name, rows in result["samples"].items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        atomic_write_text(out / "samples" / f"{safe}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {"model": model_name, "results": result["results"], "config": result["config"],
               "energy": result.get("energy")}
    atomic_write_json(out / "results.json", summary)
    licenses = sorted({f"- `{src}`: {SOURCES[src].requirement}, {SOURCES[src].license}"
                       for src in result["config"]["sources"].values() if src in SOURCES})
    c = result["config"]
    md = [f"# Evaluation of {model_name or 'the model'}", "",
          f"shots {c['shots']}, limit {c['limit']}, chat template {c['chat']}, chain of thought {c['cot']}, "
          f"seed {c['seed']}", "", results_table([result]),
          *([render_energy(result["energy"]), ""] if result.get("energy") else []),
          "Data sources and licenses:", "", *licenses, ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    scores = {f"{name}\n{MAIN_METRIC[r['kind']]}": r[MAIN_METRIC[r["kind"]]] for name, r in result["results"].items()}
    plot_task_scores(scores, out / "results.png", title=f"{model_name} ({c['shots']}-shot)")
    return out
