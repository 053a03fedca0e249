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

SUBJECTS = ("world religions", "conceptual physics", "management")  # short questions: 5-shot fits 2,048 tokens
PER_SUBJECT = 8


def test_packaged_mmlu_is_the_full_test_set():
    rows = mmlu.rows()
    assert len(rows) == 14_042 and len({r["subject"] for r in rows}) == 57
    assert all(r["question"] != "question" for r in rows)  # the header rows are gone
    doc = mmlu.docs()[0]
    assert doc["choices"] == ["A", "B", "C", "D"] and doc["query"].endswith("\nD. Not wrong, Not wrong\nAnswer:")


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
    return [r for s in SUBJECTS for r in [r for r in rows if r["subject"] == s][:PER_SUBJECT]]


def _lm_eval_tasks(folder: Path, rows: list[dict]) -> list[str]:
    """One lm-eval task per subject: lm-eval's own mmlu template over the same rows, exemplars from the
    same (test) split with its first_n sampler."""
    template = Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml"
    names = []
    for i, subject in enumerate(SUBJECTS):
        data = folder / f"mmlu_{i}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["subject"] == subject))
        name = f"llmkit_mmlu_{i}"
        spec = {"include": str(template), "task": name, "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(data)}}, "fewshot_split": "test",
                "description": mmlu.description(subject)}
        (folder / f"{name}.yaml").write_text(json.dumps(spec))  # JSON is YAML
        names.append(name)
    return names


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_equals_lm_eval_hf_model(tiny_folder, tmp_path, shots):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok, folder = tiny_folder
    rows = _subset()
    names = _lm_eval_tasks(tmp_path, rows)
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=names,
                             num_fewshot=shots, device="cpu", batch_size=8, log_samples=True,
                             task_manager=TaskManager(include_path=str(tmp_path)))
    task = dataclasses.replace(T.get_task("mmlu"), load=lambda: [mmlu.to_doc(r) for r in rows])
    ours = evaluate(model, tok, [task], shots=shots, progress=False)

    their_lls = []
    for name in names:
        samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        their_lls += [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        assert samples[0]["arguments"][0][0] == ours["samples"]["mmlu"][len(their_lls) - len(samples)]["prompt"]
    our_lls = [row["loglikelihoods"] for row in ours["samples"]["mmlu"]]
    # float32 on both sides, the same tokens: they differ only by summation order (~1e-5 nats)
    assert our_lls == [pytest.approx(lls, abs=1e-3) for lls in their_lls]
    r = ours["results"]["mmlu"]
    per_subject = [theirs["results"][n]["acc,none"] for n in names]
    assert [r["subjects"][s] for s in SUBJECTS] == per_subject
    assert r["acc_macro"] == pytest.approx(sum(per_subject) / len(per_subject), abs=1e-12)
    assert r["acc"] == pytest.approx(sum(per_subject) / len(per_subject), abs=1e-12)  # equal-size subjects
