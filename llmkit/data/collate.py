"""Token lists -> padded batch tensors: the one ignore index and every padding and collate helper.

As torchtune's `data/_collate.py`: one place decides how rows are padded, so training, evaluation,
PPO rollouts and generation cannot disagree. Training batches are right-padded (a padded row costs
some compute but never attends across documents); generation pads on the left so every prompt ends
at the same column and the next token of each row is sampled from the same position.

Labels are already shifted: `labels[:, t]` is the target of position t, as `causal_lm_loss` expects,
and `IGNORE_INDEX` marks every position the loss must skip (prompt, template markup, padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # cross_entropy's ignore_index, as in transformers / trl / torchtune


def pad_tokens(rows: Sequence[Sequence[int]], value: int, width: int | None = None,
               left: bool = False) -> torch.Tensor:
    """A (len(rows), width) long tensor of the rows, padded with `value` on the right (or the left);
    `width` defaults to the longest row."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = width - len(row) if left else 0
        out[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the rows, padded to the longest (right, or left for generation)."""
    return pad_tokens(rows, pad_id, left=left), pad_tokens([[1] * len(r) for r in rows], 0, left=left)


def collate_shifted(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                    keep_last: bool = False) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and shifted `labels` of (ids, labels) rows, right-padded.

    `labels[t]` becomes the label of token t + 1; padding gets IGNORE_INDEX. Without `keep_last` the
    last token (which has no target) is dropped from the inputs; with it the inputs stay whole, for
    objectives that read every position (preference log-probs)."""
    inputs = [ids if keep_last else ids[:-1] for ids, _ in rows]
    ids, mask = pad_batch(inputs, pad_id)
    labels = pad_tokens([list(lab[1:]) for _, lab in rows], IGNORE_INDEX, width=ids.shape[1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_sft(examples: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    """SFT examples (`input_ids`, 0/1 `scored`) -> right-padded inputs and shifted labels, IGNORE_INDEX
    where unscored."""
    return collate_shifted([(e.input_ids, [t if s else IGNORE_INDEX for t, s in zip(e.input_ids, e.scored, strict=True)])
                            for e in examples], pad_id)


def collate_classification(items: Sequence[tuple[Sequence[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` + `attention_mask`, and one class id per row in `labels`."""
    ids, mask = pad_batch([row for row, _ in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([label for _, label in items])}


def collate_pairs(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenized preference pairs -> one right-padded batch: rows 0..B-1 chosen, B..2B-1 rejected, whole
    inputs and shifted labels; `ref_logps` (chosen then rejected) when every row has them cached."""
    batch = collate_shifted([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id, keep_last=True)
    if all("ref_logps" in r for r in rows):
        batch["ref_logps"] = torch.tensor([r["ref_logps"][0] for r in rows] + [r["ref_logps"][1] for r in rows],
                                          dtype=torch.float32)
    return batch
