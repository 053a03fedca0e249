"""Training a vision-language model in stages on the one loop (train/loop.py), as LLaVA and Llama 3.2
vision are trained: the language model stays frozen throughout.

stage 1: the projector learns to map image features into the language model's input space (and the image
    encoder with it when it starts from scratch, `train_encoder`); every language-model weight is frozen.
stage 2: + the gated cross-attention layers (cross mode) and/or LoRA adapters on the language model.

Examples are chats whose user turn holds the image placeholder (`IMAGE_TOKEN`, one special token of the
tokenizer) and whose assistant turn is scored, exactly as SFT scores it (`Tokenizer.apply_chat_template`'s
assistant mask)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.data.collate import IGNORE_INDEX
from llmkit.errors import ConfigError, DataError
from llmkit.peft.lora import LoraConfig, apply_lora
from llmkit.tokenizer import Tokenizer
from llmkit.train.loop import LoopConfig, TrainResult, train
from llmkit.vision.vlm import VisionLanguageModel

IMAGE_TOKEN = "<image>"


@dataclass
class ImageChat:
    """One example: an image (the processor's pixel tensor), the user's question, the answer to learn."""

    pixels: torch.Tensor
    question: str
    answer: str = ""


def user_turn(question: str) -> dict:
    """The user message of the chat template: the image placeholder, then the question."""
    return {"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}


def prompt_ids(model: VisionLanguageModel, tokenizer: Tokenizer, question: str) -> list[int]:
    """The generation prompt for one image and a question, placeholders expanded."""
    check_tokenizer(model, tokenizer)
    return model.expand_placeholders(tokenizer.encode_chat([user_turn(question)], add_generation_prompt=True))


def add_image_token(lm, tokenizer: Tokenizer) -> int:
    """The id of `IMAGE_TOKEN` in `tokenizer`, added as a special token if missing (a pretrained LM's
    tokenizer, SmolLM2's say, has none) with the LM's vocabulary grown to hold it (`resize_vocab`), as
    LLaVA and SmolVLM add `<image>` to their language model's tokenizer. Build the VLMConfig with it."""
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id is None:
        image_id = tokenizer.add_special_tokens([IMAGE_TOKEN])[0]
    if image_id >= lm.config.vocab_size:
        lm.resize_vocab(image_id + 1)
    return image_id


def check_tokenizer(model: VisionLanguageModel, tokenizer: Tokenizer) -> None:
    if tokenizer.token_to_id(IMAGE_TOKEN) != model.config.image_token_id:
        raise ConfigError(f"the tokenizer's {IMAGE_TOKEN} is id {tokenizer.token_to_id(IMAGE_TOKEN)}, the model's "
                          f"image_token_id {model.config.image_token_id}; train the tokenizer with {IMAGE_TOKEN} "
                          "as a special token and build the model with its id")


def encode(model: VisionLanguageModel, tokenizer: Tokenizer, example: ImageChat) -> dict:
    """input_ids and next-token labels (scored on the answer only) with the placeholder expanded."""
    check_tokenizer(model, tokenizer)
    raw, assistant = tokenizer.apply_chat_template([user_turn(example.question),
                                                    {"role": "assistant", "content": example.answer}])
    ids, mask = [], []
    for t, m in zip(raw, assistant, strict=True):
        n = model.tokens_per_image if t == model.config.image_token_id else 1
        ids += [t] * n
        mask += [m] * n
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
    return {"input_ids": ids[:-1], "labels": labels, "pixels": example.pixels}


class ImageChatBatches:
    """Random batches (with replacement across epochs: a shuffled pass, then another) of encoded examples,
    right-padded (a causal model never reads the padding to its right; its labels are IGNORE_INDEX).
    Resumable: `state_dict` holds the generator and the position in the pass."""

    def __init__(self, rows: list[dict], batch_size: int, pad_id: int, seed: int = 0):
        if not rows:
            raise DataError("no training examples")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(len(rows), generator=self.generator).tolist(), 0

    def next_batch(self) -> dict:
        picked = []
        while len(picked) < self.batch_size:
            if self.position == len(self.order):
                self.order, self.position = torch.randperm(len(self.rows), generator=self.generator).tolist(), 0
            picked.append(self.rows[self.order[self.position]])
            self.position += 1
        return collate(picked, self.pad_id)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.order, self.position = state["order"], state["position"]


def collate(rows: list[dict], pad_id: int) -> dict:
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.stack([r["pixels"] for r in rows])}


def vlm_objective(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy on the answers, the images read through the model's own path."""
    loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"])
    return loss, {"loss": loss.detach(), "tokens": (batch["labels"] != IGNORE_INDEX).sum()}


def set_stage(model: VisionLanguageModel, stage: int, train_encoder: bool = False,
              lora: LoraConfig | None = None) -> dict[str, int]:
    """Freeze and unfreeze for `stage` (1 or 2); returns the trainable parameter count of each part."""
    if stage not in (1, 2):
        raise ConfigError(f"stage={stage}; expected 1 (projector) or 2 (+ cross-attention / LoRA)")
    if stage == 1 and model.config.mode == "cross":
        raise ConfigError("stage 1 (projector only) of a cross-attention model: its image path goes through "
                          "zero gates, so no gradient reaches the projector; start at stage 2 (cross-attention "
                          "layers, with the projector and encoder)")
    if stage == 2 and lora is None and not len(model.cross):
        raise ConfigError("stage 2 trains the cross-attention layers or LoRA adapters; this prefix-mode model has "
                          "no cross-attention layers, so pass a LoraConfig")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.encoder.requires_grad_(train_encoder)
    if stage == 2:
        model.cross.requires_grad_(True)
        if lora is not None:
            if getattr(model.lm, "lora_config", None) is None:
                apply_lora(model.lm, lora)
            for name, p in model.lm.named_parameters():
                p.requires_grad_(".lora_" in name)
    parts = {"encoder": model.encoder, "projector": model.projector, "cross": model.cross, "lm": model.lm}
    return {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}


def train_stage(model: VisionLanguageModel, data: ImageChatBatches, config: LoopConfig, out_dir: str | Path,
                eval_batches=None) -> TrainResult:
    """One stage on the loop; the checkpoint holds the trainable and frozen tensors alike (safetensors)."""
    from safetensors.torch import save_file

    def save_weights(path: Path, state: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()
                   if not (k == "lm.lm_head.weight" and model.lm.config.tie_embeddings)},
                  str(path / "model.safetensors"))

    return train(model, vlm_objective, data, config, out_dir, model_config=model.lm.config,
                 eval_batches=eval_batches, save_weights=save_weights)
