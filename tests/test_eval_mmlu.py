"""MMLU: the packaged test set's shape, and `llmkit eval`'s prompts and scores equal to lm-eval's own `mmlu`
template (its `_default_template_yaml`, read from the installed lm-eval) run by lm-eval's `hf` model on the
same weights, 0- and 5-shot, on three subjects' first eight questions."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from gguf_helpers import tiny_tokenizer

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.eval import evaluate, mmlu
from llmkit.eval import tasks as T
from llmkit.model import Transformer

lm_eval = pytest.importorskip("lm_eval")

SUBJECTS = {"world religions": 6, "conceptual physics": 7, "management": 8}  # short questions; unequal sizes


def test_packaged_mmlu_is_the_full_test_set():
    rows = mmlu.rows()
    assert len(rows) == 14_042 and len({r["subject"] for r in rows}) == 57
    assert all(r["question"] != "question" for r in rows)  # the header rows are gone
    docs = mmlu.docs()
    assert docs[0]["choices"] == ["A", "B", "C", "D"] and docs[0]["subject"] == "abstract algebra"
    assert len({d["subject"] for d in docs[:57]}) == 57  # interleaved: any --limit spans the subjects
    moral = [d for d in docs if d["subject"] == "moral scenarios"]
    assert moral[0]["query"].endswith("\nD. Not wrong, Not wrong\nAnswer:") and len(moral) == 895


def test_first_n_exemplars_are_the_subjects_first_questions_without_the_doc():
    docs = mmlu.docs()
    task = T.get_task("mmlu")
    subject = [d for d in docs if d["subject"] == "management"]
    assert T.exemplars(task, docs, 0, subject[7], 5, seed=0) == subject[:5]
    assert T.exemplars(task, docs, 0, subject[2], 5, seed=0) == subject[:2] + subject[3:6]
    with pytest.raises(ConfigError, match="at most 5 shots"):
        evaluate(None, None, ["mmlu"], shots=6)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random llama over the tiny BPE (2,048 positions, so 5-shot prompts are never truncated)."""
    tok = tiny_tokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                         max_seq_len=2048, init_std=0.2, rope_theta=10000.0, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id, name="tiny")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def _subset() -> list[dict]:
    rows = mmlu.rows()
    return [r for s, n in SUBJECTS.items() for r in [r for r in rows if r["subject"] == s][:n]]


@pytest.fixture(scope="module")
def lm_eval_run(tiny_folder, tmp_path_factory):
    """lm-eval's own mmlu template (its `_default_template_yaml`) over the same rows, one task per subject and
    shot count, exemplars from the same (test) split by its first_n sampler; one lm-eval run for all."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder, tasks = tmp_path_factory.mktemp("lm-eval-tasks"), {}
    template = Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml"
    rows = _subset()
    for i, subject in enumerate(SUBJECTS):
        data = folder / f"mmlu_{i}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["subject"] == subject))
        for shots in (0, 5):
            name = tasks[subject, shots] = f"llmkit_mmlu_{i}_{shots}"
            spec = {"include": str(template), "task": name, "dataset_path": "json", "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"test": str(data)}}, "fewshot_split": "test",
                    "num_fewshot": shots, "description": mmlu.description(subject)}
            (folder / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
    result = simple_evaluate(model="hf", model_args=f"pretrained={tiny_folder[2]},dtype=float32",
                             tasks=list(tasks.values()), device="cpu", batch_size=8, log_samples=True,
                             task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    return tasks, result


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_equals_lm_eval_hf_model(tiny_folder, lm_eval_run, shots):
    model, tok, _ = tiny_folder
    names, theirs = lm_eval_run
    rows = _subset()
    task = dataclasses.replace(T.get_task("mmlu"), load=lambda: [mmlu.to_doc(r) for r in rows])
    ours = evaluate(model, tok, [task], shots=shots, progress=False)

    their_lls, prompts = [], []
    for subject in SUBJECTS:
        samples = sorted(theirs["samples"][names[subject, shots]], key=lambda s: s["doc_id"])
        their_lls += [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        prompts += [s["arguments"][0][0] for s in samples]
    assert prompts == [row["prompt"] for row in ours["samples"]["mmlu"]]
    # float32 on both sides, the same tokens: they differ only by summation order (~1e-5 nats)
    assert [row["loglikelihoods"] for row in ours["samples"]["mmlu"]] == [pytest.approx(x, abs=1e-3) for x in their_lls]
    r = ours["results"]["mmlu"]
    per_subject = [theirs["results"][names[s, shots]]["acc,none"] for s in SUBJECTS]
    assert [r["subjects"][s] for s in SUBJECTS] == per_subject
    assert r["acc_macro"] == pytest.approx(sum(per_subject) / 3, abs=1e-12)
    micro = sum(a * n for a, n in zip(per_subject, SUBJECTS.values(), strict=True)) / sum(SUBJECTS.values())
    assert r["acc"] == pytest.approx(micro, abs=1e-12)
    assert 0 < r["acc"] < 1  # neither trivially all right nor all wrong


def test_cloze_form_is_smollm2s_lighteval_prompt():
    """`mmlu_cloze`: SmolLM2's lighteval `mmlu_cloze_prompt` (no lettered options; " " + each answer's text),
    the same questions in the same interleaved order as `mmlu`."""
    task = T.get_task("mmlu_cloze")
    docs, letters = task.load(), mmlu.docs()
    row = next(r for r in mmlu.rows() if r["subject"] == docs[1]["subject"])
    assert len(docs) == 14_042 and [d["gold"] for d in docs] == [d["gold"] for d in letters]
    assert T.build_prompt(task, docs[1], []) == (f"The following are questions about {row['subject']}.\n"
                                                 f"Question: {row['question']}\nAnswer:")
    assert docs[1]["choices"] == row["choices"] and task.target_delimiter == " "
