"""`llmkit finetune` / `merge-lora` end to end on a tiny model (every method, both tasks), bad input,
and a few LoRA SFT steps on SmolLM2 lowering the held-out loss (slow)."""

import io
import json

import pytest
import torch
from serve_helpers import get, llmkit_serve, post

from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.errors import FormatError
from llmkit.eval.runner import run_eval
from llmkit.generate import generate
from llmkit.generate.chat import load as chat_load
from llmkit.model import Transformer
from llmkit.peft.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from llmkit.tokenizer import Tokenizer
from llmkit.train import finetune
from llmkit.train.finetune import FinetuneConfig

QA = [("Who wrote King Lear?", "Shakespeare."), ("When?", "Around 1606."), ("Where?", "London."),
      ("Is it sad?", "Very."), ("Who dies?", "Most of them.")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tok = Tokenizer.train_chars([" ".join(q + " " + a for q, a in QA) + " good bad user assistant\n"],
                                chat_template="chatml")
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=len(tok))).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(40):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"instruction": q, "output": a}) + "\n")
    with open(root / "cls.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": "good" if i % 2 else "bad", "label": i % 2}) + "\n")
    return root


def run(*argv):
    return main(["finetune", "--max-steps", "4", "--batch-size", "4", "--progress", "false", "--lr", "1e-2",
                 "--warmup-steps", "0", "--device", "cpu", "--eval-every", "0", *argv])


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """A LoRA SFT run (4 steps) and its last checkpoint merged by `llmkit merge-lora`."""
    root = tmp_path_factory.mktemp("lora")
    assert run("--model", str(base / "model"), "--data", str(base / "sft.jsonl"), "--method", "lora",
               "--lora-r", "4", "--out-dir", str(root / "run")) == 0
    checkpoint = root / "run" / "checkpoints" / "step-0000004"
    assert main(["merge-lora", "--model", str(base / "model"), "--adapter", str(checkpoint),
                 "--out", str(root / "merged")]) == 0
    return root / "run", checkpoint, root / "merged"


def test_lora_sft_then_merge(base, lora_run):
    out, checkpoint, merged = lora_run
    report = json.loads((out / "report.json").read_text())
    assert report["trainable_parameters"] == 2 * 4 * (4 * 64 + 2 * 32 + 64 + 64 + 3 * (64 + 192))
    assert report["val_loss"] < report["val_loss_before"]
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = load_adapter(Transformer.from_pretrained(base / "model"), checkpoint)(ids)
        merged_logits = Transformer.from_pretrained(merged)(ids)
    torch.testing.assert_close(merged_logits, adapted, rtol=0, atol=1e-5)
    assert (merged / "tokenizer.json").is_file()


def test_an_adapter_checkpoint_is_a_model_for_every_verb(base, lora_run, tmp_path, capsys, monkeypatch):
    run_dir, checkpoint, merged = lora_run
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((base / "model").resolve())  # peft's field, absolute
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    adapted, tok = chat_load(str(checkpoint))
    assert tok is not None and adapted.dtype == torch.float32 and not any("lora" in k for k in adapted.state_dict())
    with torch.no_grad():  # merged at load in fp32, as merge-lora merges: the same sums in the same order
        torch.testing.assert_close(adapted(ids), chat_load(str(merged))[0](ids), rtol=0, atol=1e-6)
    capsys.readouterr()
    outputs = {}
    for name, model in (("adapter", checkpoint), ("merged", merged)):
        assert main(["generate", str(model), "-p", "Who wrote", "-n", "6", "--temp", "0", "--ignore-eos",
                     "--json"]) == 0
        outputs[name, "generate"] = json.loads(capsys.readouterr().out)[0]["token_ids"]
        monkeypatch.setattr("sys.stdin", io.StringIO("Who wrote King Lear?\n"))
        assert main(["chat", str(model), "-n", "6", "--temp", "0", "--ignore-eos"]) == 0
        outputs[name, "chat"] = capsys.readouterr().out
        task = tmp_path / "task.jsonl"
        task.write_text(json.dumps({"query": "Who wrote King Lear?", "choices": ["Shakespeare.", "London."],
                                    "gold": 0}) + "\n")
        outputs[name, "eval"] = run_eval(str(model), [str(task)], out=str(tmp_path / f"eval-{name}"))["results"]
    for verb in ("generate", "chat", "eval"):
        assert outputs["adapter", verb] == outputs["merged", verb], verb
    assert main(["generate", str(run_dir), "-p", "Who wrote", "-n", "6", "--temp", "0", "--ignore-eos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["token_ids"] == outputs["adapter", "generate"]  # the run's newest
    assert len(outputs["adapter", "generate"]) == 6 and "Who wrote King Lear?" not in outputs["adapter", "chat"]


def test_an_adapter_without_a_recorded_base_says_how_to_use_it(base, tmp_path):
    model = Transformer.from_pretrained(base / "model")
    apply_lora(model, LoraConfig(r=2, targets=("q",)))
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(FormatError, match="records no base model .* `llmkit merge-lora BASE --adapter"):
        chat_load(str(tmp_path / "adapter"))


@pytest.mark.parametrize("method,lr", [("full", 3e-3), ("qlora", 3e-2), ("prompt", 3e-2)])
def test_classify_each_method(base, tmp_path, method, lr):
    config = FinetuneConfig(model=str(base / "model"), data=str(base / "cls.jsonl"), task="classify", method=method,
                            max_steps=6, batch_size=8, lr=lr, warmup_steps=0, val_fraction=0.25, progress=False, device="cpu",
                            eval_every=0, out_dir=str(tmp_path), prompt_tokens=2, lora_r=2)
    result = finetune.run(config)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["val_loss"] < report["val_loss_before"]
    assert 0 <= report["val_accuracy"] <= 1
    files = {p.name for p in result.last_checkpoint.iterdir()}
    assert ("model.safetensors" in files) == (method == "full")
    assert ("adapter_model.safetensors" in files) == (method != "full")


def test_resume_a_lora_run(base, tmp_path):
    args = ["--model", str(base / "model"), "--data", str(base / "sft.jsonl"), "--lora-r", "2", "--save-every", "2",
            "--schedule", "constant"]  # the same lr whatever max_steps is, so a run cut at 2 steps can resume
    assert run(*args, "--out-dir", str(tmp_path / "a")) == 0
    assert run(*args, "--out-dir", str(tmp_path / "b"), "--max-steps", "2") == 0
    assert run(*args, "--out-dir", str(tmp_path / "b"), "--resume") == 0
    a = [json.loads(line)["loss"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
         if "loss" in json.loads(line)]
    b = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
         if "loss" in json.loads(line)]
    assert a == b


def test_bad_input_is_one_clear_error(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"input": "x"}) + "\n")
    assert run("--model", str(base / "model"), "--data", str(bad)) == 1
    assert "bad.jsonl:2: a row with keys ['input']" in capsys.readouterr().err
    assert run("--model", str(base / "model"), "--data", str(base / "sft.jsonl"), "--lora-r", "0") == 1
    assert "rank r must be a positive integer, got 0" in capsys.readouterr().err
    assert run("--model", str(base / "model"), "--data", str(base / "sft.jsonl"), "--lora-targets", "q,gate,wq") == 1
    assert "unknown ['wq']" in capsys.readouterr().err
    assert run("--model", str(base / "model"), "--data", str(base / "sft.jsonl"), "--method", "dpo") == 1
    assert "method='dpo'" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_sft_on_smollm2_lowers_held_out_loss(tmp_path):
    """Sentiment prompts -> " positive"/" negative" on SmolLM2-135M-Instruct: 4 LoRA steps of 8 reviews."""
    config = FinetuneConfig(model="smollm2-135m-instruct", data="movie_reviews", method="lora", max_examples=32,
                            val_fraction=0.002, max_len=48, batch_size=8, max_steps=4, lr=1e-3, warmup_steps=0,
                            progress=False, eval_every=0, out_dir=str(tmp_path), lora_r=8)
    finetune.run(config)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["val_examples"] >= 16
    assert report["val_loss"] < report["val_loss_before"] - 0.1, report


@pytest.mark.parametrize("recipe", ["sft-lora", "sft-qlora", "sentiment-head", "sentiment-sft-lora"])
def test_recipes_build_valid_configs(recipe):
    from pathlib import Path

    from llmkit.options import build_config

    config = build_config(FinetuneConfig, Path(__file__).parent.parent / "recipes" / f"{recipe}.yaml")
    config.validate()
    config.lora()


def test_every_phase_of_a_finetune_run_shows_progress(base, tmp_path, capsys):
    assert run("--model", str(base / "model"), "--data", str(base / "cls.jsonl"), "--task", "classify",
               "--num-labels", "2", "--method", "lora", "--out-dir", str(tmp_path / "run"), "--progress", "true") == 0
    err = capsys.readouterr().err
    for phase in (f"load {base / 'model'} ...", f"read and tokenize {base / 'cls.jsonl'}: ",
                  "validation before training", "train", "validation:", "validation accuracy"):
        assert phase in err, phase
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "loss" in r][-1]
    assert err.rsplit("loss=", 1)[1][:6] == f"{last['loss']:.4f}" and last["tokens_seen"] > 0


def test_a_validation_split_larger_than_the_training_one_is_warned(base, tmp_path, capsys):
    assert run("--model", str(base / "model"), "--data", str(base / "sft.jsonl"), "--method", "lora",
               "--max-examples", "1", "--max-steps", "1", "--out-dir", str(tmp_path / "run")) == 0
    assert "warning: " + str(base / "sft.jsonl") + ": 2 validation examples but 1 training ones" in capsys.readouterr().err


def test_serve_lora_modules_serves_each_adapter_under_its_name(base, lora_run, tmp_path):
    """vLLM's --lora-modules: the base under its name, each adapter under its own; greedy replies and their
    log-probs equal llmkit.generate on the base and on the merged checkpoint."""
    run_dir, checkpoint, merged = lora_run
    with llmkit_serve([str(base / "model"), "--compile", "false", "--served-model-name", "base", "--lora-modules", f"sft={run_dir}"],
                      tmp_path / "serve.log") as url:
        models = json.loads(get(f"{url}/v1/models")[1])["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("base", None), ("sft", "base")]
        for name, folder in (("base", base / "model"), ("sft", merged)):
            status, out, _ = post(f"{url}/v1/completions", {"model": name, "prompt": "Who wrote", "max_tokens": 6,
                                                            "temperature": 0, "ignore_eos": True, "logprobs": 0})
            model, tok = chat_load(str(folder))
            expected = generate(model, tok, "Who wrote", max_new_tokens=6, temperature=0, ignore_eos=True,
                                logprobs=0)
            assert status == 200 and out["model"] == name and out["choices"][0]["text"] == expected.text, name
            torch.testing.assert_close(out["choices"][0]["logprobs"]["token_logprobs"], list(expected.logprobs),
                                       rtol=0, atol=1e-4)  # fp32 sums of one model, batched vs alone
        status, out, _ = post(f"{url}/v1/completions", {"model": "other", "prompt": "x"})
        assert status == 404 and "'base', 'sft'" in out["error"]["message"]
    assert main(["serve", str(base / "model"), "--lora-modules", "sft"]) == 1  # NAME=PATH expected
