"""The `llmkit` command, run as a real subprocess."""

import json
import subprocess
import sys

from llmkit import ModelConfig, Transformer


def llmkit(*args):
    return subprocess.run([sys.executable, "-m", "llmkit.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_verbs():
    out = llmkit("--help")
    assert out.returncode == 0
    assert "info" in out.stdout and "demo" in out.stdout


def test_info_on_a_preset_counts_gpt2_parameters():
    out = llmkit("info", "gpt2", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["parameters"] == 124_439_808
    assert summary["weight_memory_bytes"]["fp32"] == 4 * 124_439_808
    assert summary["weight_memory_bytes"]["bf16"] == 2 * 124_439_808
    assert summary["flops_per_token_training"] == 3 * summary["flops_per_token_forward"]


def test_info_on_a_checkpoint_folder(tmp_path):
    model = Transformer(ModelConfig.from_preset("llama-tiny"))
    model.save_pretrained(tmp_path)
    out = llmkit("info", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"parameters: {model.num_parameters():,}" in out.stdout
    assert "FLOPs per token" in out.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    out = llmkit("info", str(tmp_path))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("llmkit info: error: ") and "unsupported model_type 'mamba'" in out.stderr


def test_demo_saves_reloads_and_runs(tmp_path):
    out = llmkit("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    assert "reloaded model matches exactly" in out.stdout
    assert (tmp_path / "demo" / "model.safetensors").exists()
