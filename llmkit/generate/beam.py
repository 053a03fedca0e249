"""Beam search, batched: every prompt keeps `num_beams` beams in one KV-cached batch.

The algorithm is transformers' vectorised beam search, step for step, so the two give the same
tokens: each step takes the top (1 + #EOS, at least 2) * num_beams continuations of all beams of a
prompt; the best num_beams that did not just end keep running; those among the top num_beams that
ended (EOS, or the length limit) join the finished hypotheses with score
sum(logprobs) / generated_length ** length_penalty. `early_stopping`: True stops a prompt as soon
as num_beams hypotheses are finished; False stops when the best running beam (scored at its current
length) can no longer beat the worst finished one; "never" scores it at the maximum length when
length_penalty > 0.
"""

from __future__ import annotations

import torch

from llmkit.errors import ConfigError
from llmkit.generate.engine import Completion, DecodeStep, check_prompts, eos_token_ids, left_pad
from llmkit.generate.sampling import SamplingParams
from llmkit.model import KVCache, Transformer

NEG = -1.0e9  # transformers' "impossible" score; kept identical so ties break the same way


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b, j], ...] for each prompt b (transformers' `_gather_beams`)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.inference_mode()
def beam_search(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                tokenizer=None) -> list[Completion]:
    """The best `params.n` beams of each prompt, best first, prompt-major."""
    check_prompts(model, prompts)
    if params.stop_strings:
        raise ConfigError("stop strings are not supported with beam search (num_beams > 1)")
    K, B, device = params.num_beams, len(prompts), model.device
    ids, mask = left_pad(prompts, model.config.pad_token_id or 0, device)
    width = ids.shape[1]
    max_new = min(params.max_new_tokens, model.config.max_seq_len - width)
    if max_new <= 0:
        return [Completion(index=b * params.n + i, prompt_token_ids=list(p), text="" if tokenizer else None,
                           finish_reason="length") for b, p in enumerate(prompts) for i in range(params.n)]
    eos = torch.tensor(eos_token_ids(model, tokenizer, params), dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * K
    top_num_beams = torch.arange(keep, device=device) < K
    lp, early = params.length_penalty, params.early_stopping

    cache = KVCache(model.config, B, width + max_new, device=device, dtype=model.dtype)
    logits = model.logits(model.hidden_states(ids, mask, kv_cache=cache)[:, -1])
    rows = torch.arange(B, device=device).repeat_interleave(K)
    cache.reorder(rows)
    logits = logits.index_select(0, rows)
    step = DecodeStep(model)

    running = torch.zeros(B, K, max_new, dtype=torch.long, device=device)
    running_scores = torch.full((B, K), NEG, device=device)
    running_scores[:, 0] = 0.0
    finished = running.clone()
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    offsets = torch.arange(B, device=device)[:, None] * K

    for cur in range(max_new):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if cur < params.min_tokens and len(eos):  # as transformers: EOS banned after the softmax
            logprobs[:, eos] = -float("inf")
        V = logprobs.shape[-1]
        scores = (logprobs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_scores, top_idx = torch.topk(scores, keep)
        src = top_idx // V
        tokens = top_idx % V
        cand = _gather(running, src)
        cand[:, :, cur] = tokens
        hits = torch.isin(tokens, eos) | (cur + 1 >= max_new)

        # the best num_beams candidates that did not just end keep running
        alive_scores = top_scores + hits.float() * NEG
        nxt = torch.topk(alive_scores, K).indices
        running = _gather(cand, nxt)
        running_scores = _gather(alive_scores, nxt)
        running_src = _gather(src, nxt)

        # candidates among the top num_beams that ended may enter the finished hypotheses
        just_finished = hits & top_num_beams[None, :]
        fin = top_scores / ((cur + 1) ** lp)
        fin = fin + (is_finished.all(-1, keepdim=True) & (early is True)).float() * NEG
        fin = fin + (~improvable).float() * NEG
        fin = fin + (~just_finished).float() * NEG
        merged = torch.topk(torch.cat((finished_scores, fin), 1), K).indices
        finished = _gather(torch.cat((finished, cand), 1), merged)
        finished_scores = _gather(torch.cat((finished_scores, fin), 1), merged)
        finished_len = _gather(torch.cat((finished_len, torch.full_like(fin, cur + 1, dtype=torch.long)), 1), merged)
        is_finished = _gather(torch.cat((is_finished, just_finished), 1), merged)

        # can any prompt still improve?
        generated = cur + 1
        best_len = max_new if (early == "never" and lp > 0) else generated
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(is_finished.all()) and early is True) and not bool(hits.all())
        if not go_on:
            break
        cache.reorder((running_src + offsets).view(-1))
        logits = step(running[:, :, cur].reshape(-1), cache)

    eos_set = set(eos.tolist())
    out = []
    for b, prompt in enumerate(prompts):
        for i in range(params.n):
            toks = finished[b, i, :int(finished_len[b, i])].tolist()
            c = Completion(index=b * params.n + i, prompt_token_ids=list(prompt), token_ids=toks,
                           score=float(finished_scores[b, i]),
                           finish_reason="stop" if toks and toks[-1] in eos_set else "length")
            if tokenizer is not None:
                c.text = tokenizer.decode(toks[:-1] if c.finish_reason == "stop" else toks)
            out.append(c)
    return out
