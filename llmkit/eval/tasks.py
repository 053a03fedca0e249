"""The task registry and the five task types, with lm-eval's prompt and metric definitions.

A task is data (a list of docs in one small schema) plus how to prompt and score it:

- `multiple_choice`: docs `{"query", "choices", "gold"}`; each choice is scored by log-likelihood as
  the continuation `target_delimiter + choice`. `acc` takes the best total log-likelihood,
  `acc_norm` the best log-likelihood per character of the choice and `acc_bytes` per UTF-8 byte
  (lm-eval 0.4's definitions, `ConfigurableTask.process_results`).
- `classification`: the same scoring over a fixed label set (P(label | prompt)); `acc`, `macro_f1`.
- `generation`: docs `{"query", "answer"}` (answer: a string or a list of accepted strings); greedy
  decoding until a stop string, the answer extracted with a regex (lm-eval's `regex` filter:
  `re.findall`, the `group_select`-th match, `fallback` when none), then `exact_match`
  (and SQuAD's `f1` when `normalize="squad"`).
- `code`: docs `{"query" (the prompt), "test", "entry_point"}`; completions run with their tests in the
  sandbox (`llmkit.eval.sandbox`); `pass@k` by the unbiased estimator of Chen et al. (2021).
- `summarization`: docs `{"query", "answer"}`; ROUGE-1/2/L F-measures (Google's `rouge-score`).

Prompts are lm-eval's plain-text layout: `description`, then k exemplars each
`query + target_delimiter + target + fewshot_delimiter`, then the query; with `chat=True` the same
text becomes one user turn (the description the system turn) rendered by the tokenizer's chat
template with the generation prompt, and choices follow it with no delimiter. Exemplars come from the
task's pool (never the doc itself) by a seeded draw per doc, so `--limit` does not change them.
`cot=True` is the chain-of-thought variant: exemplars show their worked solution before "The answer
is X." and a zero-shot prompt ends with "Let's think step by step.".
"""

from __future__ import annotations

import collections
import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.errors import ConfigError, DataError
from llmkit.files import read_jsonl_rows

KINDS = ("multiple_choice", "classification", "generation", "code", "summarization")
COT_ZERO_SHOT = "Let's think step by step."
COT_ANSWER = r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)"


@dataclass
class Task:
    name: str
    kind: str
    load: Callable[[], list[dict]] = field(repr=False)  # the evaluation docs
    fewshot_pool: Callable[[], list[dict]] | None = field(default=None, repr=False)  # None: the docs themselves
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = ("\n\n",)
    max_gen_toks: int = 64
    answer_regex: str | None = None  # generation: extract the answer (None: the whole stripped output)
    group_select: int = 0  # which regex match: 0 the first, -1 the last
    fallback: str = "[invalid]"
    normalize: str = "strip"  # "none" | "strip" | "number" | "squad": how answers are compared
    samples: int = 1  # code: completions per problem (1: greedy; n > 1: temperature 0.8)
    source: str = ""  # the data's registry name (its license goes into the report)
    default_limit: int | None = None  # a full run's size, when the data set is open-ended
    max_shots: int | None = None  # 0: zero-shot only (the prompt already has exemplars, or they cannot fit)
    # (pool, doc, shots) -> exemplars, for tasks with canonical ones (MMLU: the subject's first n); None: a seeded draw
    fewshot_select: Callable[[list[dict], dict, int], list[dict]] | None = field(default=None, repr=False)
    # (docs, per-doc sample rows) -> more results (per-subject scores, bias scores), merged into the task's results
    aggregate: Callable[[list[dict], list[dict]], dict] | None = field(default=None, repr=False)
    # generation: the raw output -> the text answers are extracted from (e.g. citation marks removed)
    postprocess: Callable[[str], str] | None = field(default=None, repr=False)
    # doc -> the doc as evaluated, applied after `--limit` to the evaluated docs only (retrieval); exemplars unchanged
    prepare: Callable[[dict], dict] | None = field(default=None, repr=False)
    # keyword options -> a configured copy of the task (`configure`); None: the task takes none
    options: Callable[..., Task] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind {self.kind!r} is unknown; expected one of {', '.join(KINDS)}")


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """A registered task by name, or one defined by a file (`.yaml` in lm-eval's format, or `.jsonl`)."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith((".yaml", ".yml", ".jsonl")):
        return task_from_file(name)
    import llmkit.eval.builtin  # noqa: F401  (registers the built-in tasks)

    if name in TASKS:
        return TASKS[name]
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))} "
                      "(or a task file: .jsonl, or an lm-eval .yaml over local JSONL)")


def configure(task: Task | str, **options) -> Task:
    """`task` with `options` applied (e.g. `configure("squad_closedbook", retrieve=fn)`); an option the task
    does not take is a ConfigError naming the ones it does."""
    task = task if isinstance(task, Task) else get_task(task)
    if not options:
        return task
    if task.options is None:
        raise ConfigError(f"task {task.name!r} takes no options, got {', '.join(sorted(options))}")
    return task.options(**options)


def known_tasks() -> list[str]:
    import llmkit.eval.builtin  # noqa: F401

    return sorted(TASKS)


# ---- docs and task files --------------------------------------------------------------------------


def check_doc(doc, kind: str, where: str) -> dict:
    """Raise DataError naming `where` (file:line) unless `doc` has the fields `kind` needs."""
    def bad(what: str):
        raise DataError(f"{where}: {what}; a {kind} row needs {_SCHEMA[kind]}")

    if not isinstance(doc, dict):
        bad(f"expected a JSON object, got {type(doc).__name__}")
    if not isinstance(doc.get("query"), str):
        bad("'query' is missing or not a string")
    if kind in ("multiple_choice", "classification"):
        choices, gold = doc.get("choices"), doc.get("gold")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            bad("'choices' must be a list of at least two strings")
        if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
            bad(f"'gold' must be an index into the {len(choices)} choices, got {gold!r}")
    elif kind == "code":
        for key in ("test", "entry_point"):
            if not isinstance(doc.get(key), str):
                bad(f"{key!r} is missing or not a string")
    else:
        answer = doc.get("answer")
        if not (isinstance(answer, str) or (isinstance(answer, list) and answer
                                              and all(isinstance(a, str) for a in answer))):
            bad("'answer' must be a string or a non-empty list of strings")
    return doc


_SCHEMA = {
    "multiple_choice": '{"query": str, "choices": [str, ...], "gold": int}',
    "classification": '{"query": str, "choices": [label, ...], "gold": int}',
    "generation": '{"query": str, "answer": str or [str, ...]}',
    "summarization": '{"query": str, "answer": str}',
    "code": '{"query": prompt, "test": str, "entry_point": str}',
}


def read_task_docs(path: str | Path, kind: str) -> list[dict]:
    """Docs of a JSONL task file, each checked; a bad row raises DataError naming its line."""
    path = Path(path)
    docs = [check_doc(row, kind, where) for where, row in read_jsonl_rows(path, f"a {kind} task file of rows "
                                                                                f"with {_SCHEMA[kind]}")]
    if not docs:
        raise DataError(f"task file {path} has no rows; expected JSON lines like {_SCHEMA[kind]}")
    return docs


def _infer_kind(path: Path) -> str:
    rows = read_jsonl_rows(path, f"rows like {_SCHEMA['multiple_choice']} or {_SCHEMA['generation']}")
    _, row = next(rows, (None, None))
    return "multiple_choice" if isinstance(row, dict) and "choices" in row else "generation"


# lm-eval's TaskConfig fields (0.4): a task YAML holds only these, so a misspelt (or damaged) key is an
# error instead of a setting silently left at its default.
_LM_EVAL_KEYS = {"task", "task_alias", "tag", "group", "custom_dataset", "dataset_path", "dataset_name",
                 "dataset_kwargs", "training_split", "validation_split", "test_split", "fewshot_split",
                 "process_docs", "doc_to_text", "doc_to_target", "doc_to_image", "doc_to_audio", "unsafe_code",
                 "doc_to_choice", "process_results", "use_prompt", "description", "target_delimiter",
                 "fewshot_delimiter", "fewshot_config", "num_fewshot", "metric_list", "output_type",
                 "generation_kwargs", "repeats", "filter_list", "should_decontaminate",
                 "doc_to_decontamination_query", "gen_prefix", "multiple_input", "metadata"}
# What llmkit reads from it, with the type each must have.
_YAML_TYPES = {"task": str, "dataset_kwargs": dict, "test_split": str, "description": str, "target_delimiter": str,
               "fewshot_delimiter": str, "generation_kwargs": dict, "filter_list": list}


def _read_task_yaml(path: Path) -> dict:
    """The mapping of an lm-eval task YAML; anything else (bad UTF-8 or YAML, unknown keys, a value of the
    wrong type) is a ConfigError naming the file."""
    import yaml

    try:
        spec = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected an lm-eval task YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); expected an lm-eval task YAML") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: holds a YAML {type(spec).__name__}; expected a mapping of lm-eval task keys")
    unknown = sorted(str(k) for k in set(spec) - _LM_EVAL_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; expected lm-eval TaskConfig keys")
    for key, kind in _YAML_TYPES.items():
        if key in spec and not isinstance(spec[key], kind):
            raise ConfigError(f"{path}: {key} is {spec[key]!r}; expected a {kind.__name__}")
    return spec


def task_from_file(path: str | Path) -> Task:
    """A task from a JSONL file (kind from its first row: `choices` means multiple choice) or from an
    lm-eval task YAML over a local JSONL file in llmkit's schema (doc_to_text `{{query}}`, ...), so one
    definition serves `lm_eval --include_path` and `llmkit eval`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist")
    if path.suffix == ".jsonl":
        kind = _infer_kind(path)
        return Task(path.stem, kind, lambda: read_task_docs(path, kind), until=("\n",) if kind == "generation" else ())
    spec = _read_task_yaml(path)
    output_type = spec.get("output_type")
    kind = {"multiple_choice": "multiple_choice", "generate_until": "generation"}.get(output_type)
    if kind is None:
        raise ConfigError(f"{path}: output_type {output_type!r} is not supported here; "
                          "expected multiple_choice or generate_until")
    expected = {"doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"}
    if kind == "generation":
        expected = {"doc_to_text": "{{query}}", "doc_to_target": "{{answer}}"}
    for key, value in expected.items():
        if str(spec.get(key, "")).replace(" ", "") != value:
            raise ConfigError(f"{path}: {key} is {spec.get(key)!r}; llmkit reads task YAMLs over its JSONL schema, "
                              f"expected {value!r}")
    files = spec.get("dataset_kwargs", {}).get("data_files")
    split = spec.get("test_split", "test")
    if spec.get("dataset_path") != "json" or not isinstance(files, dict) or not isinstance(files.get(split), str):
        raise ConfigError(f"{path}: expected dataset_path: json and dataset_kwargs.data_files.{split}: a JSONL file")
    data = Path(files[split])  # lm-eval (datasets) reads it relative to the working folder; else beside the YAML
    data = data if data.is_absolute() or data.is_file() else path.parent / data
    if not data.is_file():
        raise ConfigError(f"{path}: dataset_kwargs.data_files.{split} is {files[split]!r}, which is not a file (here "
                          "or beside the YAML)")
    gen = spec.get("generation_kwargs", {})
    until, max_gen_toks = gen.get("until", ["\n\n"]), gen.get("max_gen_toks", 256)
    if not (isinstance(until, list) and all(isinstance(u, str) for u in until) and type(max_gen_toks) is int):
        raise ConfigError(f"{path}: generation_kwargs is {gen!r}; expected until: a list of strings and "
                          "max_gen_toks: an integer")
    regex, group, fallback = _regex_filter(spec.get("filter_list"), path)
    return Task(spec.get("task", path.stem), kind, lambda: read_task_docs(data, kind),
                description=spec.get("description", ""), target_delimiter=spec.get("target_delimiter", " "),
                fewshot_delimiter=spec.get("fewshot_delimiter", "\n\n"), until=tuple(until),
                max_gen_toks=max_gen_toks, answer_regex=regex, group_select=group, fallback=fallback, normalize="none")


def _regex_filter(filter_list, path: Path) -> tuple[str | None, int, str]:
    """(regex, group_select, fallback) of the first filter pipeline's `regex` step, if any, checked."""
    regex, group, fallback = None, 0, "[invalid]"
    steps = (filter_list or [{}])[0]
    steps = steps.get("filter", []) if isinstance(steps, dict) else None
    if not isinstance(steps, list) or not all(isinstance(f, dict) for f in steps):
        raise ConfigError(f"{path}: filter_list is {filter_list!r}; expected [{{name, filter: [{{function, ...}}]}}]")
    for flt in steps:
        if flt.get("function") == "regex":
            regex, group, fallback = flt.get("regex_pattern"), flt.get("group_select", 0), flt.get("fallback", fallback)
            if not (isinstance(regex, str) and type(group) is int and isinstance(fallback, str)):
                raise ConfigError(f"{path}: the regex filter {flt!r} needs regex_pattern: a string, group_select: an "
                                  "integer and fallback: a string")
            try:
                re.compile(regex)
            except re.error as e:
                raise ConfigError(f"{path}: regex_pattern {regex!r} is not a valid regex ({e})") from None
    return regex, group, fallback


# ---- prompts ----------------------------------------------------------------------------------


def target_text(task: Task, doc: dict, cot: bool = False) -> str:
    """What an exemplar shows after its query."""
    if task.kind in ("multiple_choice", "classification"):
        return doc["choices"][doc["gold"]]
    if task.kind == "code":
        return doc.get("canonical_solution", "")
    answer = doc["answer"] if isinstance(doc["answer"], str) else doc["answer"][0]
    if cot and doc.get("rationale"):
        return f"{doc['rationale'].strip()} The answer is {answer}."
    return answer


def exemplars(task: Task, docs_pool: list[dict], doc_index: int, doc: dict, shots: int, seed: int) -> list[dict]:
    """`shots` exemplars for doc `doc_index`: a seeded draw from the pool, never the doc itself."""
    if shots <= 0:
        return []
    if task.fewshot_select is not None:
        return task.fewshot_select(docs_pool, doc, shots)
    pool = [d for d in docs_pool if d is not doc and d.get("query") != doc.get("query")]
    if shots > len(pool):
        raise ConfigError(f"task {task.name!r}: {shots}-shot needs {shots} exemplars but its pool has only "
                          f"{len(pool)} other docs; use --shots {len(pool)} or fewer")
    return random.Random(seed * 1_000_003 + doc_index).sample(pool, shots)


def build_prompt(task: Task, doc: dict, shots: list[dict], tokenizer=None, chat: bool = False,
                 cot: bool = False) -> str:
    """lm-eval's context string (see the module docstring)."""
    query = doc["query"]
    if cot and not shots and task.kind == "generation":
        query = f"{query}{'' if query.endswith((' ', chr(10))) else ' '}{COT_ZERO_SHOT}"
    body = "".join(d["query"] + task.target_delimiter + target_text(task, d, cot) + task.fewshot_delimiter
                   for d in shots) + query
    description = doc.get("description", task.description)  # per doc where it names the doc's subject
    if not chat:
        return description + body
    if tokenizer is None or tokenizer.chat_template is None:
        raise ConfigError(f"task {task.name!r}: the chat variant needs a tokenizer with a chat template")
    messages = ([{"role": "system", "content": description.strip()}] if description.strip() else [])
    messages.append({"role": "user", "content": body})
    return tokenizer.render_chat(messages, add_generation_prompt=True)


# ---- metrics ----------------------------------------------------------------------------------


def extract_answer(text: str, task: Task, cot: bool = False) -> str:
    """lm-eval's regex filter: the `group_select`-th of `re.findall`, first non-empty group; else fallback."""
    pattern = COT_ANSWER if cot and task.answer_regex else task.answer_regex
    if pattern is None:
        return text
    matches = re.findall(pattern, text)
    if cot and not matches and task.answer_regex:  # no "The answer is": the task's own pattern, last match
        matches = re.findall(task.answer_regex, text)[-1:]
    if not matches:
        return task.fallback
    try:
        match = matches[task.group_select if not cot else -1]
    except IndexError:
        match = matches[0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), match[0])
    return match


def normalize(text: str, how: str) -> str:
    if how == "none":
        return text
    text = text.strip()
    if how == "number":
        return text.replace(",", "").rstrip(".")
    if how == "squad":
        text = "".join(c for c in text.lower() if c not in set(string.punctuation))
        text = re.sub(r"\b(a|an|the)\b", " ", text)
        return " ".join(text.split())
    return text


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1's token-overlap F1 of normalized answers."""
    pred, ref = normalize(prediction, "squad").split(), normalize(reference, "squad").split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def macro_f1(golds: Sequence[int], preds: Sequence[int], n_labels: int) -> float:
    scores = []
    for label in range(n_labels):
        tp = sum(g == label and p == label for g, p in zip(golds, preds, strict=True))
        fp = sum(g != label and p == label for g, p in zip(golds, preds, strict=True))
        fn = sum(g == label and p != label for g, p in zip(golds, preds, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / n_labels


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and lm-eval's standard error (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)

