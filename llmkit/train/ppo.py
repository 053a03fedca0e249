"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022) on the one training loop and the engine.

Each iteration:
1. rollout: the current policy continues a batch of prompts through the generation engine
   (`llmkit.generate.engine.complete`);
2. scoring: the reward model scores prompt + response (its scalar head on the last token); the
   per-token reward is -kl_coef * KL_t (policy vs frozen reference, Schulman's estimator) with
   the score added on the last response token;
3. advantages by GAE over the response tokens, from the value head's estimates;
4. `ppo_epochs` passes of shuffled mini-batches through the clipped policy and value losses.

Steps 1-3 live in `Rollouts.next_batch()`, the data source the training loop pulls mini-batches
from, so the loop does what it does for every objective (AdamW, clipping, NaN guard, metrics,
checkpoints); `ppo_objective` is step 4's loss. One optimizer step is one mini-batch.

The value head is the Transformer's own `score` head (`num_labels=1`) read at every position
instead of the last one: the policy and its value function share the body, as in trl's classic
`AutoModelForCausalLMWithValueHead`, so one forward pass gives both. That needs a tied LM head
(an untied model with `num_labels` keeps no LM head); SmolLM2 and llmkit's presets are tied.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit.analysis.plots import plot_ppo_rollouts
from llmkit.data import preferences as prefs
from llmkit.data.collate import pad_batch
from llmkit.data.split import hold_out
from llmkit.errors import ConfigError, DataError
from llmkit.generate.engine import complete
from llmkit.generate.sampling import SamplingParams
from llmkit.losses import KL_ESTIMATORS, check_beta, gae, kl_estimate, masked_whiten
from llmkit.model import Transformer, load
from llmkit.options import arg
from llmkit.tokenizer import check_same_tokenizer
from llmkit.train.loop import LoopConfig, TrainResult, resolve_device, train
from llmkit.train.objectives import ppo_objective, response_forward
from llmkit.train.report import run_summary, write_report
from llmkit.train.reward import reward_model_from


@dataclass
class PPOConfig(LoopConfig):
    policy: str = field(default="", metadata=arg("the starting policy: an LM checkpoint folder or name (also the "
                                                 "first positional argument, as every verb takes its model)",
                                                 positional=True))
    reward_model: str = field(default="", metadata={"help": "a reward model folder (num_labels=1), e.g. from "
                                                            "`llmkit reward`"})
    prompts: str = field(default="movie_reviews", metadata={"help": "movie_reviews (review openings) or a text "
                                                                     "file with one prompt per line"})
    prompt_words: int = field(default=4, metadata={"help": "movie_reviews: words of each opening"})
    out_dir: str = "runs/ppo"
    iterations: int = field(default=30, metadata={"help": "rollout + optimisation rounds (sets max_steps)"})
    rollout_size: int = field(default=32, metadata={"help": "prompts per rollout"})
    mini_batch: int = field(default=8, metadata={"help": "rollout rows per optimizer step"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    response_tokens: int = field(default=24, metadata={"help": "tokens generated per prompt"})
    temperature: float = 1.0
    top_k: int = 0
    kl_coef: float = field(default=0.05, metadata={"help": "initial coefficient of the per-token KL penalty"})
    kl_target: float | None = field(default=None, metadata={"help": "adaptive KL: target KL per sequence "
                                                                     "(None: fixed coefficient)"})
    kl_horizon: int = 10000
    kl_estimator: str = field(default="k1", metadata={"help": f"per-token KL estimator, one of {KL_ESTIMATORS}"})
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    eval_prompts: int = field(default=64, metadata={"help": "held-out prompts scored before and after"})
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    max_steps: int = 0  # set from iterations

    def validate(self) -> None:
        self.max_steps = self.iterations * self.ppo_epochs * self.minibatches_per_rollout
        super().validate()
        check_beta(self.kl_coef)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
        if self.rollout_size % self.mini_batch:
            raise ConfigError(f"rollout_size {self.rollout_size} is not a multiple of mini_batch {self.mini_batch}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ConfigError(f"kl_target={self.kl_target}; expected a positive KL (nats per sequence) or None")

    @property
    def minibatches_per_rollout(self) -> int:
        return max(self.rollout_size // max(self.mini_batch, 1), 1)


# ---- the value head and the KL coefficient -----------------------------------------------------


def policy_with_value_head(lm: Transformer) -> Transformer:
    """The LM plus a zero-initialised `score` head used as the per-token value function."""
    if not lm.config.tie_embeddings:
        raise ConfigError("PPO's value head shares the policy's body through the `score` head, which needs a tied "
                          "LM head; expected a checkpoint with tie_embeddings=true")
    model = reward_model_from(lm)
    torch.nn.init.zeros_(model.score.weight)
    return model


def lm_only(model: Transformer) -> Transformer:
    """The policy without its value head, as an ordinary LM checkpoint."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    return Transformer.from_state_dict(model.config.replace(num_labels=0), state)


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon.
    With target None the coefficient stays fixed."""

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        check_beta(init_coef)
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ---- rollouts --------------------------------------------------------------------------------


@torch.no_grad()
def score(reward_model: Transformer, tokenizer, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """The reward model's scalar for each prompt + response (+ EOS, as its training pairs end)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    rows = [p + r + eos for p, r in zip(prompts, responses, strict=True)]
    ids, mask = pad_batch(rows, 0)
    return reward_model.classify(ids.to(reward_model.device), mask.to(reward_model.device))[:, 0].float().cpu()


def generate(policy: Transformer, tokenizer, prompts: list[list[int]], config: PPOConfig) -> list[list[int]]:
    """Responses of exactly `response_tokens` tokens (EOS is held back until then, so every
    continuation has the same length and reads as review text). Sampling draws from torch's global
    generator (seeded by the run), so the rows of a rollout are independent samples; a per-request
    seed would give every prompt the same random stream."""
    params = SamplingParams(max_new_tokens=config.response_tokens, min_tokens=config.response_tokens,
                            temperature=config.temperature, top_k=config.top_k)
    was_training = policy.training
    policy.eval()
    outs = complete(policy, prompts, params)
    policy.train(was_training)
    return [o.token_ids for o in outs]


class Rollouts:
    """The loop's data source: a fresh rollout whenever the previous one has been used `ppo_epochs` times."""

    def __init__(self, policy, reference, reward_model, tokenizer, prompts: list[list[int]], config: PPOConfig):
        self.policy, self.reference, self.reward_model, self.tokenizer = policy, reference, reward_model, tokenizer
        self.prompts, self.config = prompts, config
        self.kl = AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.iteration, self.queue, self.history = 0, [], []

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "kl_coef": self.kl.value}

    def load_state_dict(self, state: dict) -> None:
        self.iteration, self.kl.value, self.queue = state["iteration"], state["kl_coef"], []

    def next_batch(self) -> dict:
        if not self.queue:
            self._rollout()
        return self.queue.pop(0)

    @torch.no_grad()
    def _rollout(self) -> None:
        c, device = self.config, self.policy.device
        rng = random.Random(c.seed * 1_000_003 + self.iteration)
        prompts = [self.prompts[i] for i in rng.sample(range(len(self.prompts)), c.rollout_size)]
        responses = generate(self.policy, self.tokenizer, prompts, c)
        batch = {k: v.to(device) for k, v in pack(prompts, responses).items()}
        self.policy.eval()
        old_logps, old_values, _ = response_forward(self.policy, batch)
        self.policy.train()
        ref_logps = response_forward(self.reference, batch)[0]
        mask = batch["response_mask"].float()
        scores = score(self.reward_model, self.tokenizer, prompts, responses).to(device)
        kl = kl_estimate(old_logps, ref_logps, c.kl_estimator) * mask
        rewards = -self.kl.value * kl
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(prompts), device=device), last] += scores
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        advantages = masked_whiten(advantages, mask)
        seq_kl = kl.sum(1).mean().item()
        stats = {"iteration": self.iteration, "reward": scores.mean().item(), "reward_std": scores.std().item(),
                 "kl": seq_kl, "kl_coef": self.kl.value, "response_tokens": mask.sum(1).mean().item()}
        self.history.append(stats)
        self.kl.update(seq_kl, c.rollout_size)
        batch.update(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns,
                     **{f"rollout_{k}": torch.tensor(float(v)) for k, v in stats.items() if k != "iteration"})
        order = torch.Generator().manual_seed(c.seed + self.iteration)
        for _ in range(c.ppo_epochs):
            perm = torch.randperm(c.rollout_size, generator=order)
            for i in range(0, c.rollout_size, c.mini_batch):
                rows = perm[i:i + c.mini_batch].to(device)
                self.queue.append({k: (v.index_select(0, rows) if v.dim() > 0 else v) for k, v in batch.items()})
        self.iteration += 1


def pack(prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response rows and where each response token sits."""
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in responses)
    positions = [[len(p) + j for j in range(len(r))] + [len(p)] * (width - len(r))
                 for p, r in zip(prompts, responses, strict=True)]
    input_ids, attention_mask = pad_batch(rows, 0)
    responses, response_mask = pad_batch(responses, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "responses": responses,
            "positions": torch.tensor(positions, dtype=torch.long), "response_mask": response_mask}


# ---- the run ---------------------------------------------------------------------------------


def load_prompts(config: PPOConfig, tokenizer, split: str, n: int | None = None) -> list[str]:
    if config.prompts == "movie_reviews":
        size = n or (2000 if split == "train" else config.eval_prompts)
        return prefs.review_openings(size, words=config.prompt_words, split=split, seed=config.seed)
    path = Path(config.prompts)
    if not path.is_file():
        raise DataError(f"prompts {config.prompts!r} is neither 'movie_reviews' nor a file of prompts")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held = hold_out(lines, n_val=max(len(lines) // 10, 1), seed=None)  # the first tenth, in file order
    return held[:n or config.eval_prompts] if split == "test" else train


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return [bos + tokenizer.encode(t) for t in texts]


@torch.no_grad()
def evaluate_policy(policy, reward_model, tokenizer, prompts: list[list[int]], texts: list[str],
                    config: PPOConfig) -> dict:
    """Mean reward of sampled continuations of held-out prompts, with a few samples to read; the
    same random stream before and after training, without disturbing the run's own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 12345)
        responses = generate(policy, tokenizer, prompts, config)
    scores = score(reward_model, tokenizer, prompts, responses)
    samples = [{"prompt": t, "response": tokenizer.decode(r), "reward": round(s, 3)}
               for t, r, s in zip(texts, responses, scores.tolist(), strict=True)]
    return {"mean_reward": scores.mean().item(), "positive_share": (scores > 0).float().mean().item(),
            "samples": samples}


def run(config: PPOConfig) -> TrainResult:
    config.validate()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    lm, tokenizer = load(config.policy, dtype=torch.float32)
    reward_model, rm_tokenizer = load(config.reward_model, dtype=torch.float32)
    if reward_model.score is None or reward_model.config.num_labels != 1:
        raise ConfigError(f"reward model {config.reward_model!r} has no scalar head (num_labels="
                          f"{reward_model.config.num_labels}); expected one trained by `llmkit reward`")
    check_same_tokenizer(tokenizer, rm_tokenizer, f"reward model {config.reward_model!r}")
    policy = policy_with_value_head(lm)
    reference = copy.deepcopy(lm).requires_grad_(False).eval().to(device)
    reward_model.requires_grad_(False).eval().to(device)
    policy.to(device)
    train_texts = load_prompts(config, tokenizer, "train")
    eval_texts = load_prompts(config, tokenizer, "test")
    train_prompts, eval_prompts = encode_prompts(tokenizer, train_texts), encode_prompts(tokenizer, eval_texts)
    if len(train_prompts) < config.rollout_size:
        raise DataError(f"{len(train_prompts)} training prompts; expected at least rollout_size={config.rollout_size}")

    before = evaluate_policy(policy, reward_model, tokenizer, eval_prompts, eval_texts, config)
    rollouts = Rollouts(policy, reference, reward_model, tokenizer, train_prompts, config)
    out_dir = Path(config.out_dir)
    result = train(policy, ppo_objective(config.clip_range, config.clip_range_value, config.vf_coef), rollouts,
                   config, out_dir, write_extra=tokenizer.save_pretrained,
                   run_config=dataclasses.asdict(config))
    after = evaluate_policy(policy, reward_model, tokenizer, eval_prompts, eval_texts, config)
    final = lm_only(policy)
    final.save_pretrained(out_dir / "policy")
    tokenizer.save_pretrained(out_dir / "policy")
    report = {"command": "ppo", "config": dataclasses.asdict(config), **run_summary(result),
              "rollouts": rollouts.history, "before": before, "after": after}
    plot_ppo_rollouts(rollouts.history, out_dir / "reward_kl.png")
    write_report(out_dir, f"PPO: `{config.policy}` optimised for `{config.reward_model}`", report,
                 report_sections(report), plots={"reward and KL": "reward_kl.png"})
    return dataclasses.replace(result, report=report)


def report_sections(report: dict) -> list[str]:
    """The run's settings, held-out rewards before and after, the rollouts' table and samples to read."""
    c, h = report["config"], report["rollouts"]
    lines = [f"- {len(h)} rollouts of {c['rollout_size']} prompts x {c['response_tokens']} tokens, "
             f"{c['ppo_epochs']} epochs, seed {c['seed']}",
             f"- KL coefficient {c['kl_coef']} ({'adaptive, target ' + str(c['kl_target']) if c['kl_target'] else 'fixed'}"
             f"), estimator {c['kl_estimator']}", "",
             f"Held-out prompts ({len(report['before']['samples'])}): mean reward "
             f"{report['before']['mean_reward']:.3f} -> {report['after']['mean_reward']:.3f}; share scored positive "
             f"{report['before']['positive_share']:.2f} -> {report['after']['positive_share']:.2f}", "",
             "| rollout | reward | KL | kl_coef |", "|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['reward']:.3f} | {r['kl']:.3f} | {r['kl_coef']:.4f} |" for r in h]
    samples = ["## Samples (held-out prompts; before -> after)", ""]
    for b, a in list(zip(report["before"]["samples"], report["after"]["samples"], strict=True))[:8]:
        samples += [f"- **{b['prompt']}**", f"  - before ({b['reward']:+.2f}): {json.dumps(b['response'])}",
                    f"  - after ({a['reward']:+.2f}): {json.dumps(a['response'])}"]
    return ["\n".join(lines), "\n".join(samples)]
