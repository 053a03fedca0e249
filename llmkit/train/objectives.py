"""Objectives: `(model, batch) -> (loss, metrics)`, the functions the one loop runs; the one place they live.

Each runs the model on a batch and hands the tensors to its loss in `llmkit.losses` (the math
lives there, without a model). `metrics` holds detached scalars the loop logs; `tokens` (the number
of scored tokens) feeds the throughput counters.

- continued pretraining and SFT: `causal_lm_loss` (SFT batches carry IGNORE_INDEX labels on the
  prompt, the template and the padding; `llmkit.data.chat` builds them), also named `sft_loss`; on a
  mixture-of-experts model it adds the router losses (`router_losses`) with the config's coefficients;
- masked-language modelling on an encoder: `mlm_loss` (batches from `llmkit.data.masking`);
- sequence classification: `classification_loss` on `Transformer.classify`;
- preferences: `reward_objective` (Bradley-Terry on a scalar head), `dpo_objective` (DPO/IPO);
- RLHF: `ppo_objective` on `response_forward` (the policy's log-probs and its value head);
- distillation: `distill_objective` (a frozen teacher's soft labels plus the hard ones).
"""

from __future__ import annotations

import torch

from llmkit.data.collate import IGNORE_INDEX
from llmkit.errors import ConfigError
from llmkit.losses import (
    bradley_terry_loss,
    check_beta,
    cross_entropy,
    distillation_loss,
    entropy,
    expert_load,
    load_balancing_loss,
    masked_lm_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_loss,
    router_z_loss,
    sequence_logps,
    token_logps,
)
from llmkit.model import Transformer
from llmkit.moe import router_logits
from llmkit.train.distributed import unwrap

__all__ = ["IGNORE_INDEX", "OBJECTIVES", "causal_lm_loss", "check_objective", "classification_loss",
           "distill_objective", "mlm_loss",
           "dpo_objective", "ppo_objective", "response_forward", "reward_objective", "scored_logps", "sft_loss"]


def _inputs_and_labels(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"], batch.get("attention_mask")
    x, y = batch
    return x, y, None


# ---- language modelling and classification ---------------------------------------------------


def causal_lm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy (teacher forcing). `batch` is `(x, y)` with y = x shifted left,
    or a dict with `input_ids`, `labels` (IGNORE_INDEX where unscored) and `attention_mask`.

    The mean is over scored tokens, computed in at least fp32 even under autocast. A Transformer
    (also under DDP, FSDP2 or torch.compile) computes it from its hidden states without the logits."""
    x, y, mask = _inputs_and_labels(batch)
    scored = y != IGNORE_INDEX
    if isinstance(unwrap(model), Transformer):
        loss = model(x, attention_mask=mask, labels=y)
    else:
        loss = cross_entropy(model(x, attention_mask=mask) if mask is not None else model(x), y)
    metrics = {"tokens": scored.sum()}
    loss = router_losses(unwrap(model), loss, metrics, mask)
    return loss, {"loss": loss.detach(), **metrics}


def router_losses(model, loss: torch.Tensor, metrics: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`loss` plus the load-balancing and z-losses of the routers of the forward just run, weighted by
    the config's `router_aux_loss_coef` and `router_z_loss_coef` (unchanged for a dense model or an
    eval-mode forward). Adds `lm_loss`, `aux_loss`, `z_loss` and each layer's expert loads
    (`expert_load.<layer>.<expert>`, shares summing to 1 per layer) to `metrics`."""
    logits = router_logits(model) if isinstance(model, Transformer) else []
    if not logits:
        return loss
    c = model.config
    aux = load_balancing_loss(logits, c.experts_per_token, mask, per_layer=c.router_balance == "layer")
    z = router_z_loss(logits, mask)
    metrics.update(lm_loss=loss.detach(), aux_loss=aux.detach(), z_loss=z.detach())
    for layer, layer_logits in enumerate(logits):
        for e, share in enumerate(expert_load(layer_logits.detach(), c.experts_per_token, mask)):
            metrics[f"expert_load.{layer}.{e}"] = share
    return loss + c.router_aux_loss_coef * aux + c.router_z_loss_coef * z


# SFT is the causal-LM loss on masked labels: the mask lives in the data, not in the loss.
sft_loss = causal_lm_loss


def mlm_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked-language-model cross-entropy of an encoder on `{"input_ids", "labels"}` (the original token
    at the chosen positions, IGNORE_INDEX elsewhere; `llmkit.data.masking`); metrics add the
    masked-token accuracy over the chosen positions and, given `at_mask`, over those showing [MASK]."""
    labels = batch["labels"]
    chosen = labels[labels != IGNORE_INDEX]
    # The head runs at the chosen positions only: logits (n_chosen, vocab), in the order of `chosen`.
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels, scored_logits=True)
    loss, accuracy = masked_lm_loss(logits, chosen)
    metrics = {"loss": loss.detach(), "accuracy": accuracy.detach(), "tokens": chosen.new_tensor(len(chosen))}
    if "at_mask" in batch:  # the positions showing [MASK]: only the context tells the token there
        at_mask = batch["at_mask"][labels != IGNORE_INDEX]
        right = logits.detach().argmax(-1) == chosen
        metrics["mask_accuracy"] = right[at_mask].float().mean() if bool(at_mask.any()) else accuracy.detach()
    return loss, metrics


def check_objective(config, objective: str) -> None:
    """An MLM objective needs an encoder (causal=False), next-token objectives a decoder: a clear error
    before any compute instead of a model trained to cheat (a bidirectional model sees the next token)."""
    if objective == "mlm" and config.causal:
        raise ConfigError(f"objective 'mlm' needs an encoder (causal=False); model {config.name!r} is causal. Use an "
                          "encoder preset such as bert-2m")
    if objective in ("pretrain", "causal", "sft") and not config.causal:
        raise ConfigError(f"objective {objective!r} predicts the next token, but model {config.name!r} is an encoder "
                          "(causal=False) that sees it; use --objective mlm (pretraining) or --task classify")


def classification_loss(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of `model.classify` (last real token -> linear head) on a dict with `input_ids`,
    `attention_mask` and one class id per row in `labels`; metrics add the batch accuracy."""
    logits = model.classify(batch["input_ids"], batch.get("attention_mask")).float()
    labels = batch["labels"]
    loss = cross_entropy(logits, labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    tokens = (batch["attention_mask"].sum() if "attention_mask" in batch
              else batch["input_ids"].new_tensor(batch["input_ids"].numel()))
    return loss, {"loss": loss.detach(), "accuracy": accuracy.detach(), "tokens": tokens}


# ---- preference pairs (chosen rows first, then rejected) -------------------------------------


def reward_objective(model, batch):
    """Bradley-Terry on the scalar head's rewards of the chosen and the rejected halves of the batch."""
    rewards = model.classify(batch["input_ids"], batch["attention_mask"])[:, 0].float()
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, {"loss": loss.detach(), "accuracy": (chosen > rejected).float().mean(),
                  "margin": (chosen - rejected).mean().detach(), "reward_chosen": chosen.mean().detach(),
                  "reward_rejected": rejected.mean().detach()}


def scored_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-prob of its scored (response) tokens, and how many there are."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(logits, batch["labels"])


def dpo_objective(beta: float, loss_type: str = "sigmoid", reference: Transformer | None = None):
    """`(model, batch) -> (loss, metrics)` for DPO/IPO; reference log-probs come from the batch
    (`ref_logps`, precomputed) or from running `reference`."""
    check_beta(beta)

    def objective(model, batch):
        logps, tokens = scored_logps(model, batch)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            with torch.no_grad():
                ref = scored_logps(reference, batch)[0]
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        tc, tr = tokens.chunk(2)
        loss, chosen, rejected = preference_loss(pc, pr, rc, rr, beta, loss_type, tc, tr)
        return loss, {"loss": loss.detach(), "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
                      "margin": (chosen - rejected).mean(), "accuracy": (chosen > rejected).float().mean(),
                      "logps_chosen": pc.detach().mean(), "logps_rejected": pr.detach().mean()}

    return objective


# ---- PPO -------------------------------------------------------------------------------------


def response_forward(model: Transformer, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs (B, R) of the response tokens, values (B, R), logits (B, R, V)).

    `batch["positions"]` holds each response token's position in `input_ids`; its log-prob and the
    value of the state before it are read off the hidden state one position earlier."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    before = (batch["positions"] - 1).clamp(min=0)
    h = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.logits(h)
    values = model.score(h)[..., 0].float() if model.score is not None else torch.zeros(h.shape[:2])
    return token_logps(logits, batch["responses"]), values, logits


def ppo_objective(clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1):
    """The clipped policy loss plus `vf_coef` times the clipped value loss on a rollout mini-batch."""

    def objective(model, batch):
        logps, values, logits = response_forward(model, batch)
        mask = batch["response_mask"]
        pg_loss, clip_fraction, approx_kl = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                                            clip_range)
        vf_loss, vf_clip = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, clip_range_value)
        loss = pg_loss + vf_coef * vf_loss
        metrics = {"loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                   "clip_fraction": clip_fraction, "value_clip_fraction": vf_clip, "approx_kl": approx_kl,
                   "entropy": entropy(logits.detach(), mask)}
        metrics.update({k: v for k, v in batch.items() if k.startswith("rollout_")})
        return loss, metrics

    return objective


# ---- distillation ----------------------------------------------------------------------------


def distill_objective(teacher: Transformer, temperature: float, alpha: float):
    """The student's distillation loss against the frozen `teacher` on `(x, y)` token batches."""

    def objective(model, batch):
        x, y = batch
        logits = model(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss, kl, ce = distillation_loss(logits, teacher_logits, y, temperature, alpha)
        return loss, {"loss": loss.detach(), "kl": kl, "ce": ce, "tokens": (y != IGNORE_INDEX).sum()}

    return objective


OBJECTIVES = {"pretrain": causal_lm_loss, "sft": sft_loss, "classify": classification_loss, "mlm": mlm_loss}
