"""Tasks: lm-eval's answer extraction, prompts and exemplars, metrics, built-in data, the sandbox,
bad input, and `llmkit eval` end to end on a tiny model."""

import json
import math
import re
from pathlib import Path

import pytest
from gguf_helpers import tiny_model

from llmkit.cli import main
from llmkit.errors import ConfigError, DataError
from llmkit.eval import evaluate
from llmkit.eval import tasks as T
from llmkit.eval.runner import CODE_STOPS
from llmkit.eval.sandbox import run_program

ROOT = Path(__file__).resolve().parents[1]
MC_YAML, GEN_YAML = ROOT / "tests/data/eval/mc.yaml", ROOT / "tests/data/eval/gen.yaml"


# ---- extraction, metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [0, -1])
def test_regex_extraction_equals_lm_eval_filter(group):
    extraction = pytest.importorskip("lm_eval.filters.extraction")
    pattern = r"(-?[\d,]*\.?\d+)"
    flt = extraction.RegexFilter(regex_pattern=pattern, group_select=group, fallback="[invalid]")
    task = T.Task("t", "generation", list, answer_regex=pattern, group_select=group)
    texts = [" 12 + 17 = 29", "The answer is 1,234.", "no number here", "-3 and 4.5", ""]
    theirs = [r[0] for r in flt.apply([[t] for t in texts], [{}] * len(texts))]
    assert [T.extract_answer(t, task) for t in texts] == theirs


def test_cot_extraction_reads_the_answer_phrase():
    task = T.Task("t", "generation", list, answer_regex=r"(-?[\d,]*\.?\d+)", group_select=-1)
    assert T.extract_answer("3 + 4 = 7, so 7 * 2 = 14. The answer is 14. Then 99", task, cot=True) == "14"
    assert T.extract_answer("3 + 4 = 7, then 8", task, cot=True) == "8"  # no phrase: the last number


def test_pass_at_k_and_squad_f1_by_hand():
    assert T.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert T.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert T.pass_at_k(5, 5, 1) == 1.0 and T.pass_at_k(5, 0, 1) == 0.0
    assert T.normalize("The  Denver Broncos!", "squad") == "denver broncos"
    assert T.token_f1("the Denver Broncos team", "Denver Broncos") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert T.normalize(" 1,234. ", "number") == "1234"
    assert T.macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)


# ---- prompts ----------------------------------------------------------------------------------------


DOCS = [{"query": f"Q: q{i}?\nA:", "choices": ["x", "y"], "gold": i % 2} for i in range(6)]


def test_prompt_layout_is_lm_eval_plain_text():
    task = T.Task("t", "multiple_choice", lambda: DOCS, description="Answer.\n\n")
    prompt = T.build_prompt(task, DOCS[0], [DOCS[1], DOCS[2]])
    assert prompt == "Answer.\n\nQ: q1?\nA: y\n\nQ: q2?\nA: x\n\nQ: q0?\nA:"


def test_chat_prompt_uses_the_template():
    _, tok = tiny_model()
    task = T.Task("t", "multiple_choice", lambda: DOCS)
    prompt = T.build_prompt(task, DOCS[0], [DOCS[1]], tok, chat=True)
    assert prompt.endswith("<|im_start|>user\nQ: q1?\nA: y\n\nQ: q0?\nA:<|im_end|>\n<|im_start|>assistant\n")


def test_exemplars_are_seeded_per_doc_and_never_the_doc():
    task = T.Task("t", "multiple_choice", lambda: DOCS)
    picks = [T.exemplars(task, DOCS, i, d, 3, seed=1) for i, d in enumerate(DOCS)]
    assert all(d not in p and len(p) == 3 for d, p in zip(DOCS, picks, strict=True))
    assert picks == [T.exemplars(task, DOCS, i, d, 3, seed=1) for i, d in enumerate(DOCS)]
    assert picks != [T.exemplars(task, DOCS, i, d, 3, seed=2) for i, d in enumerate(DOCS)]


def test_cot_variant():
    task = T.Task("t", "generation", list, answer_regex=r"\d+")
    doc = {"query": "Question: 2+2?\nAnswer:", "answer": "4", "rationale": "2 and 2 make 4."}
    assert T.build_prompt(task, doc, [], cot=True).endswith("Answer: Let's think step by step.")
    shot = T.build_prompt(task, doc, [doc | {"query": "Question: 1+3?\nAnswer:"}], cot=True)
    assert shot.startswith("Question: 1+3?\nAnswer: 2 and 2 make 4. The answer is 4.\n\n")


# ---- bad input --------------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown task 'hellaswag'; known tasks: arithmetic, bbq, gsm, gsm8k_sample, "
                                          r"humaneval, mmlu"):
        T.get_task("hellaswag")


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"query": "a", "choices": ["x", "y"], "gold": 0}, {"query": "b", "choices": ["x", "y"], "gold": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'gold' must be an index into the 2 choices, got 2"):
        T.get_task(str(path)).load()
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        T.get_task(str(path)).load()


def test_more_shots_than_the_pool_is_refused():
    model, tok = tiny_model()
    with pytest.raises(ConfigError, match=r"12-shot needs 12 exemplars but its pool has only 11 other docs"):
        evaluate(model, tok, [str(MC_YAML)], shots=12, progress=False)
    with pytest.raises(ConfigError, match="takes at most 0 shots"):
        evaluate(model, tok, ["humaneval"], shots=1, progress=False)


# ---- built-in data ----------------------------------------------------------------------------------


# BIG-bench's tasks read the suite's miniature (tests/data/bigbench; conftest.py): its sizes, not the real ones
# (299, 1,954, 2,290, 6,000, 10,565 and 1,001, docs/eval.md)
@pytest.mark.parametrize("name,size", [("truthfulqa_mc", 3), ("social_iqa", 3), ("strategyqa", 3),
                                       ("arithmetic", 12), ("squad", 11), ("gsm", 200), ("sentiment", 1000),
                                       ("xsum", 3), ("humaneval", 164)])
def test_builtin_tasks_load_valid_docs(name, size):
    task = T.get_task(name)
    docs = task.load()
    assert len(docs) == size
    for i, doc in enumerate(docs[:50]):
        T.check_doc(doc, task.kind, f"{name}[{i}]")
    assert task.source


def test_bigbench_tasks_read_its_schema():
    """Prompts, gold indices and answers from BIG-bench's JSON (the miniature's hand-written values)."""
    from llmkit.eval.builtin import ARITHMETIC

    truthful = T.get_task("truthfulqa_mc").load()
    assert truthful[0]["query"].startswith("Q: How many legs does a spider have?\nA: A spider has eight legs.\n\n")
    assert truthful[0]["query"].endswith("\nQ: What happens if you swallow a cherry stone?\nA:")
    assert [d["gold"] for d in truthful] == [0, 1, 2]  # the choice scored 1, wherever it stands
    assert [d["gold"] for d in T.get_task("social_iqa").load()] == [2, 1, 0]
    strategy = T.get_task("strategyqa").load()
    assert [d["choices"][d["gold"]] for d in strategy] == ["Yes", "No", "No"]
    assert strategy[1]["query"] == "Q: Can you walk from Paris to New York in a single afternoon?\nA:"
    arithmetic = T.get_task("arithmetic").load()
    assert [d["subtask"] for d in arithmetic] == list(ARITHMETIC) * 2  # interleaved, one of each in turn
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for d in arithmetic:
        a, op, b = re.fullmatch(r"Q: What is (\d+) (\w+) (\d+)\?\nA:", d["query"]).groups()
        assert d["answer"] == str(ops[op](int(a), int(b)))
        assert op == {"addition": "plus", "subtraction": "minus", "multiplication": "times"}[d["subtask"].split("_")[-1]]
    squad = T.get_task("squad").load()
    assert squad[2]["query"].startswith("Title: Super Bowl 50\n\nBackground: Super Bowl 50 was an American football")
    assert squad[2]["query"].endswith("\n\nQuestion: What was the final score of the game?\n\nAnswer:")
    assert squad[2]["answer"] == ["24 to 10"] and squad[2]["id"] == "fx0003"
    xsum = T.get_task("xsum").load()
    assert xsum[2]["query"].startswith("Article: The library will open on Sundays") and xsum[2]["query"].endswith(
        "new shifts.\n\nTL;DR:")
    assert xsum[2]["answer"] == "A library is to open on Sundays after readers asked for weekend hours."


def test_gsm_is_a_fixed_set():
    from llmkit.eval.builtin import gsm

    docs = gsm()
    assert docs[0]["query"].startswith("Question: There are 12 students playing basketball and twice that number")
    assert docs[0]["answer"] == "70" and docs[0]["rationale"].endswith("= 70 students.")
    assert not {d["query"] for d in docs} & {d["query"] for d in gsm(seed=7, size=50)}


# ---- the sandbox ------------------------------------------------------------------------------------


def _humaneval(i):
    from llmkit.eval.builtin import humaneval

    return humaneval()[i]


def _program(doc, body):
    return f"{doc['query']}{body}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def test_sandbox_passes_canonical_solutions_and_fails_wrong_ones():
    for i in (0, 2):
        doc = _humaneval(i)
        assert run_program(_program(doc, doc["canonical_solution"])).status == "passed"
        assert not run_program(_program(doc, "    return None\n")).passed


def test_sandbox_contains_hostile_candidates(tmp_path):
    doc = _humaneval(0)
    outside = tmp_path / "escaped.txt"
    loop = run_program(_program(doc, "    while True:\n        pass\n"), timeout=3)
    assert loop.status == "timeout" and loop.seconds < 10
    net = run_program(_program(doc, "    import socket\n    socket.create_connection(('pypi.org', 443), 5)\n"
                                    "    return True\n"))
    assert not net.passed and "sandbox" in net.status
    write = run_program(_program(doc, f"    open({str(outside)!r}, 'w').write('x')\n"
                                      "    return any(abs(a - b) < threshold for a in numbers for b in numbers"
                                      " if a is not b)\n"))
    assert not write.passed and "outside the sandbox" in write.status and not outside.exists()
    spawn = run_program(_program(doc, f"    import os\n    os.system('touch {outside}')\n    return False\n"))
    assert not spawn.passed and not outside.exists()
    fork_bomb = run_program("import os\nwhile True:\n    os.fork()\n", timeout=3)
    assert not fork_bomb.passed


def test_code_stops_are_humaneval_s():
    assert CODE_STOPS[:5] == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


# ---- llmkit eval end to end -------------------------------------------------------------------------


def test_cli_eval_writes_report_equal_to_the_library(tmp_path, capsys):
    model, tok = tiny_model()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["eval", str(folder), "--tasks", f"{MC_YAML},{GEN_YAML}", "--shots", "2", "--limit", "6",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| llmkit_local_mc | multiple_choice | 2 | 6 | acc |" in printed.out
    assert f"load {folder} ..." in printed.err and "llmkit_local_mc" in printed.err  # the load, then each task's bar
    saved = json.loads((out / "results.json").read_text())["results"]
    direct = evaluate(model, tok, [str(MC_YAML), str(GEN_YAML)], shots=2, limit=6, progress=False)["results"]
    assert saved == json.loads(json.dumps(direct))
    assert (out / "results.png").stat().st_size > 1000 and (out / "report.md").is_file()
    assert len((out / "samples" / "llmkit_local_mc.jsonl").read_text().splitlines()) == 6
    assert main(["eval", str(folder), "--tasks", "nope"]) == 1


def test_generation_batches_equal_one_at_a_time():
    from llmkit.eval.lm import generate_until

    model, tok = tiny_model(std=0.5)
    prompts = ["The quick brown fox", "To be", "def add(a, b):\n    return", "In the beginning God created"]
    batched = generate_until(model, tok, prompts, ["\n"], 12, batch_size=4, progress=False)
    single = [generate_until(model, tok, [p], ["\n"], 12, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single and all("\n" not in t for t in batched) and any(batched)
    drawn = generate_until(model, tok, prompts[:2], [], 6, samples=3, seed=1, progress=False)
    assert len(drawn) == 6 and drawn == generate_until(model, tok, prompts[:2], [], 6, samples=3, seed=1,
                                                       progress=False)
