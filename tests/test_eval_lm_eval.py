"""lm-evaluation-harness compatibility on the same weights (SmolLM2-135M-Instruct, saved as an HF folder):
`lm_eval --model hf` (transformers), `lm_eval --model llmkit` (through `python -m llmkit.eval.lm_eval`)
and `llmkit eval` give the same acc / acc_norm / exact_match on two local tasks defined as lm-eval YAML
over local JSONL (tests/data/eval/mc.yaml, gen.yaml), and the same per-document outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_helpers import smollm2, smollm2_hf_folder

from llmkit.eval import evaluate

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TASKS = "llmkit_local_mc,llmkit_local_gen"


@pytest.fixture(scope="module")
def smol_folder():
    return smollm2_hf_folder()


def _lm_eval(backend: str, folder: Path, out: Path) -> tuple[dict, dict]:
    module = "lm_eval" if backend == "hf" else "llmkit.eval.lm_eval"
    args = f"pretrained={folder}" + (",dtype=float32" if backend == "hf" else "")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", module, "--model", backend, "--model_args", args, "--device", "cpu",
                           "--batch_size", "4", "--tasks", TASKS, "--include_path", "tests/data/eval",
                           "--output_path", str(out), "--log_samples"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in TASKS.split(","):
        path = next(out.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def test_lm_eval_hf_llmkit_and_llmkit_eval_agree(smol_folder, tmp_path):
    hf, hf_samples = _lm_eval("hf", smol_folder, tmp_path / "hf")
    ours, our_samples = _lm_eval("llmkit", smol_folder, tmp_path / "llmkit")
    model, tok, _ = smollm2()
    native = evaluate(model, tok, [str(ROOT / "tests/data/eval/mc.yaml"), str(ROOT / "tests/data/eval/gen.yaml")],
                      progress=False)["results"]

    mc, gen = hf["llmkit_local_mc"], hf["llmkit_local_gen"]
    print("hf:", mc["acc,none"], mc["acc_norm,none"], gen["exact_match,extract"])
    assert 0 < mc["acc,none"] < 1 and 0 < gen["exact_match,extract"] < 1  # neither trivially 0 nor 1
    for key in ("acc,none", "acc_norm,none"):
        assert ours["llmkit_local_mc"][key] == mc[key]
    assert ours["llmkit_local_gen"]["exact_match,extract"] == gen["exact_match,extract"]
    assert native["llmkit_local_mc"]["acc"] == mc["acc,none"]
    assert native["llmkit_local_mc"]["acc_norm"] == mc["acc_norm,none"]
    assert native["llmkit_local_gen"]["exact_match"] == gen["exact_match,extract"]

    # per document: the choice log-likelihoods to 1e-4 and the generated text exactly
    for a, b in zip(hf_samples["llmkit_local_mc"], our_samples["llmkit_local_mc"], strict=True):
        assert [float(r[0]) for r in a["filtered_resps"]] == pytest.approx(
            [float(r[0]) for r in b["filtered_resps"]], rel=1e-4, abs=1e-4)
    assert [s["resps"] for s in hf_samples["llmkit_local_gen"]] == [s["resps"] for s in our_samples["llmkit_local_gen"]]
