"""PPO and distillation end to end on tiny models (fast invariants; the demonstrations are in docs/align.md)."""

import json

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.data.corpora import documents
from llmkit.data.shards import write_shards
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer
from llmkit.train import distill, objectives, ppo, pretrain
from llmkit.train.distill import DistillConfig
from llmkit.train.loop import train
from llmkit.train.objectives import response_forward
from llmkit.train.pretrain import PretrainConfig
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


class EvenTokenShare(torch.nn.Module):
    """A rule-based reward model: the share of response tokens with an even id (about 0.5 for a random
    policy). It stands where PPO puts a reward model: `classify` on prompt + response + EOS rows."""

    def __init__(self, response_tokens: int):
        super().__init__()
        self.response_tokens, self.device = response_tokens, torch.device("cpu")

    def classify(self, input_ids, attention_mask):
        end = attention_mask.sum(1, keepdim=True) - 1  # each row's EOS
        position = torch.arange(input_ids.shape[1])[None]
        response = (position >= end - self.response_tokens) & (position < end)
        return ((input_ids % 2 == 0) & response).sum(1, keepdim=True).float() / self.response_tokens


def test_adaptive_kl_controller_by_hand():
    kl = ppo.AdaptiveKLController(0.1, target=2.0, horizon=100)
    assert kl.update(3.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # KL / target - 1 = 0.5, clipped to 0.2
    assert kl.update(1.8, 10) == pytest.approx(0.102 * (1 - 0.1 * 10 / 100))  # 0.9 - 1 = -0.1, within the clip
    assert ppo.AdaptiveKLController(0.1).update(50.0, 10) == 0.1  # no target: a fixed coefficient


def test_ppo_raises_a_rule_based_reward_and_steers_the_kl_coefficient(models, tmp_path):
    """PPO against the even-token reward: the mean reward of 64 sampled continuations (the same random
    stream before and after) rises by at least 0.2 in 80 optimizer steps (10 rollouts; measured +0.26, and
    +0.26 to +0.39 over six seeds), and the adaptive controller moves its coefficient toward the target
    after every rollout: down while the KL is below it, up once above."""
    root, tokenizer = models
    lm = Transformer.from_pretrained(root / "lm")
    reward = EvenTokenShare(8)
    texts = ["the movie", "a film", "i loved", "it was"] * 16
    prompts = ppo.encode_prompts(tokenizer, texts)
    config = ppo.PPOConfig(policy="rule", reward_model="rule", out_dir=str(tmp_path), iterations=10, rollout_size=16,
                           mini_batch=8, ppo_epochs=4, response_tokens=8, lr=1e-2, kl_coef=0.01, kl_target=1.0,
                           kl_horizon=64, progress=False, seed=1)
    config.validate()
    policy = ppo.policy_with_value_head(lm)
    before = ppo.evaluate_policy(policy, reward, tokenizer, prompts, texts, config)["mean_reward"]
    rollouts = ppo.Rollouts(policy, lm.requires_grad_(False).eval(), reward, tokenizer, prompts, config)
    train(policy, objectives.ppo_objective(), rollouts, config, tmp_path)
    after = ppo.evaluate_policy(policy, reward, tokenizer, prompts, texts, config)["mean_reward"]
    assert after > before + 0.2, (before, after)  # 512 scored tokens: the mean's noise is ~0.02

    kls = [r["kl"] for r in rollouts.history]
    coefs = [r["kl_coef"] for r in rollouts.history] + [rollouts.kl.value]
    assert min(kls) < 1.0 < max(kls)  # both directions are exercised
    for coef, kl, following in zip(coefs[:-1], kls, coefs[1:], strict=True):
        assert (following > coef) == (kl > 1.0), (kls, coefs)  # up while the KL is above the target, else down
        # by Ziegler et al.'s rule, with 16 samples per rollout over a horizon of 64
        assert following == pytest.approx(coef * (1 + max(-0.2, min(0.2, kl - 1.0)) * 16 / 64))


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


def test_a_distilled_student_beats_hard_labels_on_held_out_text(tmp_path):
    """Hinton et al.'s setting: a teacher trained on all of tinyshakespeare, a student that sees only 1,000
    characters of it for 80 steps (~40 epochs). On hard labels alone the student memorises them; with the
    teacher's soft labels (the defaults, T=2, alpha=0.5) it learns what the teacher learnt from the rest.
    The same student, seed, steps and batches; held-out text the student and the teacher never saw.
    Measured 2.70 vs 3.22 nats per character (margins 0.33 to 0.90 over four seeds); the claim is 0.2."""
    docs = [d.text for d in documents("tinyshakespeare")]
    tokenizer = Tokenizer.train_chars(docs)
    full, small = tmp_path / "full", tmp_path / "small"
    for root, train_docs in ((full, docs[2:]), (small, [docs[2][:1000]])):
        tokenizer.save_pretrained(root / "tokenizer")
        write_shards(train_docs, tokenizer, root / "train", workers=1, progress=False)
        write_shards(docs[:1], tokenizer, root / "val", workers=1, progress=False)
    pretrain.run(PretrainConfig(model="llama-tiny", data=str(full), out_dir=str(tmp_path / "teacher"), context=64,
                                batch_size=16, max_steps=100, warmup_steps=10, lr=1e-2, eval_every=0, eval_batches=1,
                                save_every=0, progress=False, seed=1))
    common = dict(teacher=str(tmp_path / "teacher"), model="llama-tiny", data=str(small), context=64, batch_size=8,
                  max_steps=80, warmup_steps=5, lr=1e-2, eval_every=0, eval_batches=4, save_every=0, progress=False,
                  seed=2)
    soft = distill.run(DistillConfig(**common, out_dir=str(tmp_path / "soft"))).report
    hard = distill.run(DistillConfig(**common, out_dir=str(tmp_path / "hard"), alpha=0.0)).report
    soft_ce, hard_ce = soft["evals"][-1]["val_ce"], hard["evals"][-1]["val_ce"]
    assert soft_ce < hard_ce - 0.2, (soft_ce, hard_ce)
