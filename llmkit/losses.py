"""Every objective's loss, as functions of tensors (no model inside): the one place losses live.

The objectives in `llmkit.train.objectives` run a model on a batch and call one of these. Each
follows the paper and the reference implementation a user would compare with (trl), so the numbers
mean the same thing here as there:

- next-token and SFT cross-entropy: `linear_cross_entropy` straight from hidden states (what
  `Transformer(x, labels=y)` computes), `cross_entropy` from logits; classification uses the latter.
- Bradley-Terry reward loss: P(chosen > rejected) = sigmoid(r_c - r_r)  (Ouyang et al. 2022).
- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r)));
  IPO (Azar et al. 2023): ((h_c - h_r) - 1 / (2 beta))^2 on per-token averaged log-ratios, as trl.
- PPO (Schulman et al. 2017; Ziegler et al. 2019): the clipped surrogate, the clipped value loss,
  GAE, per-token KL estimators (Schulman's k1/k2/k3), entropy.
- masked-language modelling (Devlin et al. 2019): cross-entropy on the chosen positions only.
- Distillation (Hinton et al. 2015): T^2 * KL(teacher_T || student_T) mixed with hard-label CE.

Sequence-level inputs have shape (batch,); token-level ones (batch, steps) with a 0/1 `mask`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmkit.data.collate import IGNORE_INDEX
from llmkit.errors import ConfigError

PREFERENCE_LOSSES = ("sigmoid", "ipo")
KL_ESTIMATORS = ("k1", "k2", "k3")


def check_beta(beta: float) -> None:
    if not beta > 0:
        raise ConfigError(f"beta={beta!r} is invalid; expected a number > 0 (the strength of the KL "
                          "regularisation toward the reference model)")


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim=None) -> torch.Tensor:
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as trl); padding stays 0."""
    mean = masked_mean(x, mask)
    centred = x - mean
    var = masked_mean(centred ** 2, mask) * (mask.sum() / (mask.sum() - 1).clamp(min=1))
    out = centred * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---- cross-entropy -------------------------------------------------------------------------
#
# Cross-entropy straight from hidden states: the LM head and the loss, one chunk of rows at a time.
#
# The logits of a training batch (tokens x vocab, fp32) are the largest activation of a small model's
# step, and log-softmax, its backward and the zero-filled gradient each pass over all of them.
# `linear_cross_entropy` never holds them: for each chunk of rows it computes the logits, the loss
# and the gradients of both inputs at once (softmax minus one-hot, two matmuls), and keeps only the
# gradients, which are the size of the inputs. Memory falls from tokens x vocab to chunk x vocab,
# and the loss of a llama-8m step (8 x 256 tokens, vocab 8192) runs 1.5-2x faster on a 2-core CPU
# (142-160 ms against 230-360 ms, forward and backward; benchmarks/train.py times whole steps).
#
# Under tensor parallel the LM head is split by vocabulary rows (a DTensor, Shard(0), on the tp ranks) and
# the same loop runs on each rank's rows (Megatron's vocabulary-parallel cross-entropy): per chunk, one
# all-reduce of the rows' maxima and one of their exp-sums and target logits make every rank's loss the
# whole vocabulary's; each rank's weight gradient is its rows' alone, and the hidden states' gradient, a sum
# over the vocabulary, is all-reduced once at the end. No rank ever holds the whole head or its logits.


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of (..., vocab) logits against (...) labels over the positions that are not
    `ignore_index`, in at least fp32 (float64 stays) even under autocast."""
    logits = logits.flatten(0, -2)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels.flatten(), ignore_index=ignore_index)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) over the chosen positions only (labels != IGNORE_INDEX) of an
    MLM batch (Devlin et al. 2019): the other positions' logits never enter the loss."""
    chosen = labels != IGNORE_INDEX
    if not bool(chosen.any()):
        raise ConfigError("an MLM batch with no chosen position; raise mask_prob or the context")
    picked = logits[chosen]
    loss = cross_entropy(picked, labels[chosen])
    return loss, (picked.argmax(-1) == labels[chosen]).float().mean()


@torch.compiler.disable  # tuned eager code (in-place, reused buffers); tracing it only adds copies
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over the positions that are not
    `ignore_index`, equal to `F.cross_entropy(hidden @ weight.T, labels)` without its logits; with
    `softcap`, of the capped logits softcap * tanh(hidden @ weight.T / softcap).

    hidden (..., d), weight (vocab, d), labels (...). Under autocast the matmuls run in the autocast
    dtype and the softmax in fp32, as the unfused path does. The gradients are computed in the forward
    pass, only for the inputs that need one (none under `torch.no_grad`, so evaluation costs one
    matmul, not three); one backward is supported, not double backward. No scored position gives
    NaN, as in torch.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(hidden.shape[:-1])}, "
                         "one per hidden state")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    scored = labels != ignore_index
    if not bool(scored.all()):  # SFT scores a few positions: the LM head runs on those alone
        hidden, labels = hidden[scored], labels[scored]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    grad = torch.is_grad_enabled()
    vocab = _vocab_rows(weight)
    if vocab is not None:
        weight = weight.to_local()  # differentiable: its gradient becomes the DTensor's shard
    return _LinearCrossEntropy.apply(hidden, weight, labels, dtype, grad and hidden.requires_grad,
                                     grad and weight.requires_grad, softcap, vocab)


def _vocab_rows(weight: torch.Tensor) -> tuple[object, int] | None:
    """(process group, first vocabulary row) of a head split by rows over one mesh dimension (tensor
    parallel); None for a whole weight. Any other layout is refused: the loss would be silently wrong."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(weight, DTensor):
        return None
    mesh = weight.device_mesh
    # Only tp ranks read the same batch: a head sharded over data-parallel ranks (an FSDP shard) must be gathered.
    if mesh.mesh_dim_names != ("tp",) or tuple(weight.placements) != (Shard(0),):
        raise ValueError(f"linear_cross_entropy takes a whole head or one split by vocabulary rows over the "
                         f"tensor-parallel mesh dimension (\"tp\", placements (Shard(0),)); got placements "
                         f"{tuple(weight.placements)} over {mesh.mesh_dim_names}")
    rows = weight.to_local().shape[0]
    if rows * mesh.size() != weight.shape[0]:
        raise ValueError(f"the head's {weight.shape[0]} vocabulary rows are split unevenly over {mesh.size()} "
                         "ranks; the vocabulary size must be a multiple of tp")
    return mesh.get_group(), mesh.get_local_rank() * rows


def _chunk_rows(vocab: int, device: torch.device) -> int:
    # ~8 MB of fp32 logits a chunk: big enough for efficient matmuls, small enough for a CPU's
    # caches (256 rows of a vocab of 8192: 1.7x faster than a chunk of all 2048 rows there); a GPU
    # wants fewer, larger launches.
    return max(1, (1 << (26 if device.type == "cuda" else 21)) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype, grad_of_hidden, grad_of_weight, softcap, vocab):
        n = hidden.shape[0]
        group, first = vocab if vocab is not None else (None, 0)
        if group is not None:  # this rank's rows first..first + rows of the vocabulary; a label elsewhere is 0 here
            mine = (labels >= first) & (labels < first + weight.shape[0])
            labels = torch.where(mine, labels - first, 0)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden if dtype is None else hidden.to(dtype)
            w = weight if dtype is None else weight.to(dtype)
            grad_hidden = torch.empty_like(hidden) if grad_of_hidden else None
            grad_weight = torch.zeros_like(weight) if grad_of_weight else None
            exact = torch.promote_types(w.dtype, torch.float32)  # the softmax's dtype: at least fp32
            total = torch.zeros((), dtype=exact, device=hidden.device)
            rows = max(1, min(n, _chunk_rows(weight.shape[0], hidden.device)))
            # Buffers reused by every chunk: a fresh one would be fresh pages (and page faults) each time.
            scores = torch.empty(rows, weight.shape[0], dtype=exact, device=hidden.device)
            low = scores if w.dtype == exact else torch.empty_like(scores, dtype=w.dtype)
            arange = torch.arange(rows, device=hidden.device)
            for start in range(0, n, rows):
                h_i, y_i = h[start:start + rows], labels[start:start + rows]
                r = len(y_i)
                logits = torch.mm(h_i, w.t(), out=low[:r])
                probs = logits if logits.dtype == exact else scores[:r].copy_(logits)
                if softcap is not None:  # capped = cap * tanh(z / cap); d capped / dz = 1 - tanh^2
                    tanh = torch.tanh(probs.div_(softcap))
                    probs.copy_(tanh).mul_(softcap)
                target = probs.gather(1, y_i[:, None])
                peak = probs.amax(1, keepdim=True)
                if group is not None:
                    target.mul_(mine[start:start + rows, None])
                    dist.all_reduce(peak, dist.ReduceOp.MAX, group=group)
                probs.sub_(peak).exp_()  # in place, from here on: softmax, then softmax minus one-hot
                norm = probs.sum(1, keepdim=True)
                if group is not None:  # the whole vocabulary's exp-sum and target logit, in one all-reduce
                    both = torch.cat([norm, target], 1)
                    dist.all_reduce(both, group=group)
                    norm, target = both[:, :1], both[:, 1:]
                total += (peak + norm.log() - target).sum()  # logsumexp - target logit
                if not (grad_of_hidden or grad_of_weight):
                    continue
                probs.div_(norm)
                if group is None:
                    probs[arange[:r], y_i] -= 1
                else:
                    hit = mine[start:start + rows]
                    probs[arange[:r][hit], y_i[hit]] -= 1
                if softcap is not None:
                    probs.mul_(tanh.square_().neg_().add_(1))
                grad_logits = probs if w.dtype == exact else low[:r].copy_(probs)
                if grad_of_hidden and h.dtype == hidden.dtype:
                    torch.mm(grad_logits, w, out=grad_hidden[start:start + rows])
                elif grad_of_hidden:
                    grad_hidden[start:start + rows] = grad_logits @ w
                if grad_of_weight and w.dtype == weight.dtype:
                    grad_weight.addmm_(grad_logits.t(), h_i)
                elif grad_of_weight:
                    grad_weight += grad_logits.t() @ h_i
            if group is not None and grad_hidden is not None:  # each rank's rows' part of a sum over the vocabulary
                dist.all_reduce(grad_hidden, group=group)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n = n
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        scale = grad_loss / ctx.n
        grad_hidden, grad_weight = (None if g is None else g * scale.to(g.dtype) for g in ctx.saved_tensors)
        return grad_hidden, grad_weight, None, None, None, None, None, None


# ---- reward model and direct preference optimisation -----------------------------------------


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged: the negative log-likelihood of the preferences."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def check_preference_loss(beta: float, loss_type: str) -> None:
    """Refuse a bad beta or loss type before any model is loaded."""
    check_beta(beta)
    if loss_type not in PREFERENCE_LOSSES:
        raise ConfigError(f"loss_type={loss_type!r}; expected one of {PREFERENCE_LOSSES}")


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (loss_type "sigmoid") or IPO ("ipo") on summed response log-probs of shape (batch,).

    Returns (loss, chosen_rewards, rejected_rewards) with the implicit rewards
    beta * (log pi - log ref) (detached), whose difference is the margin. IPO divides each
    log-ratio by the response's token count (`chosen_tokens`, `rejected_tokens`), as trl does.
    """
    check_preference_loss(beta, loss_type)
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ConfigError("IPO averages log-ratios per token; pass chosen_tokens and rejected_tokens")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = ((delta - 1 / (2 * beta)) ** 2).mean()
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over scored positions, number of scored positions), each (batch,).

    `labels` are aligned with `logits` (already shifted): position t scores labels[t]."""
    scored = labels != ignore_index
    lp = token_logps(logits, labels.clamp(min=0))
    return (lp * scored).sum(-1), scored.sum(-1)


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position, in fp32 (batch, steps)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None])[..., 0]


# ---- PPO -------------------------------------------------------------------------------------


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020), with log r = ref_logp - logp:  k1 = -log r (unbiased, can be negative),
    k2 = (log r)^2 / 2 (low variance, biased), k3 = (r - 1) - log r (unbiased and >= 0)."""
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ConfigError(f"kl estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (batch, steps), right-padded where mask is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V = 0 after
    the last real step; returns (advantages, returns = advantages + values), zero on padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    steps = values.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate: mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old.

    Returns (loss, clip fraction, approximate KL(old || new) = mean((log r)^2) / 2)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)); returns (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions at the masked positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


# ---- distillation ----------------------------------------------------------------------------


def check_distillation(temperature: float, alpha: float) -> None:
    """Refuse a bad temperature or soft-label weight before any model is loaded."""
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature!r}; expected a number > 0")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"alpha={alpha!r}; expected the soft-label weight in [0, 1]")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5,
                      ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels).

    Both terms are means over the positions whose label is not `ignore_index`; the T^2 keeps the
    soft term's gradients on the scale of the hard term's (Hinton et al.). Returns (loss, kl, ce)."""
    check_distillation(temperature, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ; the two models need the same vocabulary")
    scored = labels != ignore_index
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = masked_mean((t.exp() * (t - s)).sum(-1), scored)
    ce = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl.detach(), ce.detach()


# ---- mixture-of-experts router losses ------------------------------------------------------
#
# Both read the router logits (tokens, experts) of every MoE layer of one forward. The load-balancing
# loss is Switch's (Fedus et al. 2021, eq. 4-6) as Mixtral's transformers code computes it: over all
# layers' tokens pooled, E * sum_e f_e * P_e, where f_e is the share of the top-k assignments that
# went to expert e (summing to k) and P_e the mean router probability of e; a perfectly even router
# scores k. The z-loss (ST-MoE, Zoph et al. 2022) is the mean squared log-sum-exp of the logits: it
# keeps them small, so the softmax stays out of fp32's round-off.


def expert_load(router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The share of one layer's top-k assignments each expert received, (experts,), summing to 1."""
    experts = router_logits.shape[-1]
    chosen = router_logits.float().topk(top_k, dim=-1).indices
    rows = torch.ones(chosen.shape[0], device=chosen.device) if mask is None else mask.reshape(-1).float()
    counts = torch.zeros(experts, device=chosen.device).index_add_(0, chosen.reshape(-1), rows.repeat_interleave(top_k))
    return counts / counts.sum().clamp(min=1)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None, per_layer: bool = False) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss over every layer's router logits; `mask` (batch, seq) leaves padding out.
    As transformers' `load_balancing_loss_func` it pools all layers' tokens into one count (top_k when
    balanced); `per_layer` averages each layer's own loss instead, so every layer must balance."""
    if per_layer:
        return torch.stack([load_balancing_loss([logits], top_k, mask) for logits in router_logits]).mean()
    experts = router_logits[0].shape[-1]
    rows = None if mask is None else mask.reshape(-1, 1).float()
    assigned = router_logits[0].new_zeros(experts, dtype=torch.float32)
    probs = torch.zeros_like(assigned)
    total = 0.0
    for logits in router_logits:
        p = logits.float().softmax(-1)
        chosen = F.one_hot(p.topk(top_k, dim=-1).indices, experts).sum(1).float()  # (tokens, experts) 0/1
        if rows is not None:
            p, chosen = p * rows, chosen * rows
        assigned = assigned + chosen.sum(0)
        probs = probs + p.sum(0)
        total = total + (p.shape[0] if rows is None else rows.sum())
    return experts * (assigned / total * probs / total).sum()


def router_z_loss(router_logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens (and layers) of logsumexp(router logits)^2."""
    z = torch.cat([logits.float().logsumexp(-1) ** 2 for logits in router_logits])
    return masked_mean(z, None if mask is None else mask.reshape(-1).repeat(len(router_logits)))
