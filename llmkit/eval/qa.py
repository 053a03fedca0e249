"""Closed-book question answering, and the same questions with retrieved passages (RAG), scored alike.

Two tasks, generation kind, exact match and SQuAD's token F1 (`normalize="squad"`):

- `squad_closedbook`: the SQuAD v1.1 dev questions (10,565 in BIG-bench `squad_shifts`) without their passage:
  `Question: ..\\n\\nAnswer:`;
- `qa_wikidata`: BIG-bench's 20,442 Wikidata fact prompts ("The country of 11 de marzo de 2004 is"), the
  answer as its continuation.

The retrieval hook. `configure(name, retrieve=fn)` (in `llmkit.eval.tasks`) returns the task named
`<name>_rag`, whose prompts put the passages that `fn(question) -> list[str]` returns above the question,
numbered `[1] ..`, `[2] ..`, with an instruction to answer from them and cite them. `fn` is called once per
evaluated question (after `--limit`; few-shot exemplars stay closed-book), through the task's `prepare`
hook, so `task.prepare(doc)` gives a caller the same passages to measure grounding with; SQuAD docs also
carry `gold_passage`, their own paragraph, for retrieval recall. Citation marks the
model writes ("[2]") are removed before the answer is scored, so closed-book and RAG scores compare alike:

    from llmkit.eval import evaluate
    from llmkit.eval.tasks import configure
    rag = configure("squad_closedbook", retrieve=lambda q: index.search(q, k=5))
    evaluate(model, tok, ["squad_closedbook", rag], limit=500)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable

from llmkit.data.sources import files, source_dir
from llmkit.errors import ConfigError, DataError
from llmkit.eval.tasks import Task

RAG_INSTRUCTION = "Answer the question using the passages above; cite the passages you use like [1]."
_CITATION = re.compile(r"\s*\[\d+\]")


def _bigbench(source: str, path: str) -> dict:
    files(source)  # fetch (and verify) once
    return json.loads((source_dir(source) / "bigbench" / "benchmark_tasks" / path).read_text(encoding="utf-8"))


@functools.cache
def squad_questions() -> list[dict]:
    docs = []
    for article in _bigbench("bigbench", "squad_shifts/squaddev_v1.1.json")["data"]:
        title = article["title"].replace("_", " ")
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                docs.append({"question": qa["question"].strip(), "query": f"Question: {qa['question'].strip()}\n\nAnswer:",
                             "answer": [a["text"] for a in qa["answers"]], "id": qa["id"], "title": title,
                             "gold_passage": para["context"]})
    return docs


@functools.cache
def wikidata_questions() -> list[dict]:
    docs = []
    for ex in _bigbench("bigbench_safety", "qa_wikidata/task.json")["examples"]:
        answers = [ex["target"]] if isinstance(ex["target"], str) else list(ex["target"])
        docs.append({"question": ex["input"].strip(), "query": ex["input"].strip(), "answer": answers})
    return docs


def rag_query(doc: dict, passages: list[str]) -> str:
    """The closed-book query with the numbered passages and the instruction above it."""
    numbered = "".join(f"[{i}] {' '.join(p.split())}\n" for i, p in enumerate(passages, 1))
    return f"{numbered}\n{RAG_INSTRUCTION}\n\n{doc['query']}"


def strip_citations(text: str) -> str:
    return _CITATION.sub("", text)


def with_retrieval(task: Task, retrieve: Callable[[str], list[str]] | None = None, **unknown) -> Task:
    """`task` as `<name>_rag`: each prompt carries what `retrieve(question)` returns (see the module docstring)."""
    if unknown:
        raise ConfigError(f"task {task.name!r}: unknown option(s) {', '.join(sorted(unknown))}; it takes: retrieve "
                          "(a callable question -> list of passage strings)")
    if not callable(retrieve):
        raise ConfigError(f"task {task.name!r}: retrieve is {retrieve!r}; expected a callable question -> list of "
                          "passage strings")
    def prepare(doc: dict) -> dict:
        passages = retrieve(doc["question"])
        if not (isinstance(passages, (list, tuple)) and all(isinstance(p, str) for p in passages)):
            raise DataError(f"task {task.name}_rag: retrieve({doc['question']!r}) returned {type(passages).__name__}; "
                            "expected a list of passage strings")
        return {**doc, "passages": list(passages), "query": rag_query(doc, list(passages))}

    return dataclasses.replace(task, name=f"{task.name}_rag", prepare=prepare, options=None)


def closed_book(name: str, load: Callable[[], list[dict]], source: str) -> Task:
    """A closed-book QA task that `configure(name, retrieve=fn)` turns into its RAG variant."""
    task = Task(name, "generation", load, until=("\n",), max_gen_toks=32, normalize="squad", source=source,
                postprocess=strip_citations)
    task.options = functools.partial(with_retrieval, task)
    return task
