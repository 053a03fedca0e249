"""PPO and distillation end to end on tiny models (fast invariants; the demonstrations are in docs/align.md)."""

import json

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.data.shards import write_shards
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import distill, ppo
from llmkit.train.distill import DistillConfig
from llmkit.train.objectives import response_forward
from llmkit.train.reward import reward_model_from

TEXT = ["the movie was great and i loved every minute of it. ", "a dull and boring film, i hated it. "] * 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    tokenizer = Tokenizer.train_chars(TEXT)
    config = ModelConfig.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64,
                                     tie_embeddings=True, max_seq_len=128)
    torch.manual_seed(0)
    lm = Transformer(config)
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    rm = reward_model_from(lm)
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    (root / "prompts.txt").write_text("\n".join(["the movie", "a film", "i loved", "it was"] * 5))
    return root, tokenizer


def test_ppo_runs_logs_and_starts_at_the_reference(models, tmp_path):
    root, tokenizer = models
    config = ppo.PPOConfig(policy=str(root / "lm"), reward_model=str(root / "rm"), prompts=str(root / "prompts.txt"),
                           out_dir=str(tmp_path), iterations=2, rollout_size=4, mini_batch=2, ppo_epochs=2,
                           response_tokens=6, eval_prompts=2, lr=1e-3, progress=False, seed=3)
    report = ppo.run(config).report
    assert report["steps"] == 2 * 2 * 2 and len(report["rollouts"]) == 2
    first = report["rollouts"][0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the reference itself
    assert first["response_tokens"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step1 = records[0]
    # first mini-batch of a rollout: new policy == old policy, so ratio 1, nothing clipped
    assert step1["clip_fraction"] == 0.0 and step1["approx_kl"] == pytest.approx(0.0, abs=1e-10)
    for key in ("policy_loss", "value_loss", "entropy", "rollout_reward", "rollout_kl", "rollout_kl_coef"):
        assert key in step1
    assert (tmp_path / "reward_kl.png").stat().st_size > 0 and "Samples" in (tmp_path / "report.md").read_text()
    policy = Transformer.from_pretrained(tmp_path / "policy")
    assert policy.config.num_labels == 0 and policy.lm_head is not None


def test_ppo_bad_input(models, tmp_path):
    root, _ = models
    with pytest.raises(ConfigError, match="beta=0"):
        ppo.PPOConfig(policy="x", reward_model="y", kl_coef=0.0).validate()
    other = Tokenizer.train_chars(["something else entirely"])
    foreign = tmp_path / "foreign"
    reward_model_from(Transformer.from_pretrained(root / "lm")).save_pretrained(foreign)
    other.save_pretrained(foreign)
    config = ppo.PPOConfig(policy=str(root / "lm"), reward_model=str(foreign), prompts=str(root / "prompts.txt"),
                           out_dir=str(tmp_path / "run"), iterations=1, rollout_size=2, mini_batch=2, progress=False)
    with pytest.raises(ConfigError, match="different tokenizer"):
        ppo.run(config)


def test_gae_on_rollout_shapes_matches_the_value_head_forward(models):
    root, tokenizer = models
    lm = Transformer.from_pretrained(root / "lm")
    model = ppo.policy_with_value_head(lm)
    prompts = [[1, 2, 3], [4, 5]]
    responses = [[6, 7], [8, 9]]
    batch = ppo.pack(prompts, responses)
    logps, values, _ = response_forward(model, batch)
    assert torch.count_nonzero(values) == 0  # the value head starts at zero
    # the log-probs equal a plain forward pass on each row alone
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        logits = lm(torch.tensor([p + r]))[0]
        expected = torch.log_softmax(logits[len(p) - 1:len(p) + len(r) - 1], -1).gather(-1, torch.tensor(r)[:, None])
        torch.testing.assert_close(logps[i], expected[:, 0], rtol=1e-5, atol=1e-5)


def test_distill_soft_labels_and_hard_label_baseline(models, tmp_path):
    root, tokenizer = models
    data = tmp_path / "shards"
    write_shards(TEXT[4:], tokenizer, data / "train", workers=1, progress=False)
    write_shards(TEXT[:4], tokenizer, data / "val", workers=1, progress=False)
    common = dict(teacher=str(root / "lm"), data=str(data), tokenizer=str(root / "lm"), context=32, batch_size=4,
                  max_steps=4, warmup_steps=0, eval_every=0, eval_batches=1, save_every=0, progress=False)
    soft = distill.run(DistillConfig(**common, out_dir=str(tmp_path / "soft"), alpha=0.5)).report
    hard = distill.run(DistillConfig(**common, out_dir=str(tmp_path / "hard"), alpha=0.0)).report
    assert soft["steps"] == hard["steps"] == 4
    assert soft["held_out_perplexity"] != hard["held_out_perplexity"]
    with pytest.raises(ConfigError, match="temperature"):
        distill.run(DistillConfig(**common, out_dir=str(tmp_path / "bad"), temperature=0.0))
