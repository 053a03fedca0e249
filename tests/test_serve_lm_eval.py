"""lm-evaluation-harness's `local-completions` model against `llmkit serve` on a local multiple-choice
task scores exactly what lm-eval's own `hf` model and llmkit's native evaluator (`llmkit.eval.evaluate`)
score on the same SmolLM2 weights: the same acc and acc_norm, and every (loglikelihood, is_greedy) pair
within 1e-4 of lm-eval hf's."""

from pathlib import Path

import pytest
from gguf_helpers import smollm2, smollm2_hf_folder

from llmkit.eval import evaluate as evaluate_natively
from llmkit.serve.app import background, create_app
from llmkit.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
TASK = "llmkit_serve_mc"


def evaluate(model: str, model_args: dict):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                          task_manager=TaskManager(include_path=str(TASKS)), batch_size=8)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK], [[r[0] for r in s["resps"]] for s in samples]


@pytest.mark.slow
def test_local_completions_against_the_server_equals_lm_eval_hf_and_llmkit_eval(monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok, _ = smollm2()
    folder = smollm2_hf_folder()

    reference, ref_resps = evaluate("hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu"})
    with background(create_app(model, tok, ServeConfig(model="smollm2", compile=False))) as url:
        served, resps = evaluate("local-completions", {"base_url": f"{url}/v1/completions", "model": "smollm2",
                                                       "num_concurrent": 4, "max_retries": 1,
                                                       "tokenized_requests": True})
    assert served["acc,none"] == reference["acc,none"]
    assert served["acc_norm,none"] == reference["acc_norm,none"]
    native = evaluate_natively(model, tok, ROOT / "tests/data/lm_eval/serve_mc.yaml", progress=False)
    native = native["results"]["llmkit_serve_mc"]
    assert native["acc"] == pytest.approx(served["acc,none"], abs=1e-12)
    assert native["acc_norm"] == pytest.approx(served["acc_norm,none"], abs=1e-12)
    assert len(resps) == len(ref_resps) == 20
    for got, want in zip(resps, ref_resps, strict=True):
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
    print(f"acc {served['acc,none']:.3f} (hf {reference['acc,none']:.3f}), "
          f"acc_norm {served['acc_norm,none']:.3f} (hf {reference['acc_norm,none']:.3f})")
