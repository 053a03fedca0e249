"""A tiny vision-language model learns to answer "What digit is this?" about real handwritten digits.

Data: scikit-learn's `load_digits` (1,797 real 8x8 scans of 0..9, 16 grey levels), upsampled to 32x32 by
the image processor (Pillow, bilinear), split 80/20 stratified (seed 0). Captions come from the labels in
several phrasings ("It is 7.", "That's a seven.", ...), questions in several too. Held out: the images
never trained on, asked "What digit is this?", answered by greedy generation and read back as a digit.

The language model: a small llmkit Transformer (SmolLM2-135M behind the same image path:
benchmarks/vision_smollm2.py) with a byte-level BPE trained on the phrasings, first pretrained on text-only chats whose image slot
holds the digit in words (stage 0: it learns to answer from what stands in that slot, as a pretrained LM
reads its input; a stage 0 with a constant placeholder gave an LM that never reads the slot, and stage 1
then stayed at chance, 0.10), then frozen:
  prefix (LLaVA): stage 1 trains the ViT (from scratch) and the projector; stage 2 adds LoRA on the LM.
  cross (Llama 3.2): the ViT, projector and zero-gated cross-attention layers train together (stage 2:
  with the gates closed, a projector-only stage 1 would get no gradient at all).
Baseline: scikit-learn's LogisticRegression on the same 64 pixels of the same split.

    python benchmarks/vision_digits.py     # results/vision_digits.json, docs/vision_digits.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

from llmkit.config import ModelConfig  # noqa: E402
from llmkit.data.collate import IGNORE_INDEX  # noqa: E402
from llmkit.model import Transformer  # noqa: E402
from llmkit.peft.lora import LoraConfig, merge_lora  # noqa: E402
from llmkit.tokenizer import CHATML_SPECIALS, Tokenizer  # noqa: E402
from llmkit.train.loop import LoopConfig, train  # noqa: E402
from llmkit.train.objectives import causal_lm_loss  # noqa: E402
from llmkit.train.vision import (  # noqa: E402
    IMAGE_TOKEN,
    ImageChat,
    ImageChatBatches,
    encode,
    prompt_ids,
    set_stage,
    train_stage,
)
from llmkit.vision import ImageProcessor, VisionConfig, VisionLanguageModel, VLMConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTIONS = ["What digit is this?", "Which number is shown?", "What number is written here?", "Read the digit."]
ANSWERS = ["It is {n}.", "This is the digit {w}.", "The number {n}.", "That's a {w}."]
ASK = QUESTIONS[0]
VISION = VisionConfig(image_size=32, patch_size=8, channels=1, d_model=64, n_layer=3, n_head=4, d_ff=128,
                      norm_eps=1e-6, image_mean=(0.5,), image_std=(0.5,))


def digit_images():
    """(PIL 'L' images, labels) of the 1,797 scans: 0..16 ink levels scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray(np.round(x * 255 / 16).astype(np.uint8), "L") for x in digits.images]
    return images, digits.target.tolist(), digits.data / 16.0


def split(n: int, labels: list[int]):
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(n), test_size=0.2, random_state=0, stratify=labels)


def chats(label: int, rng: np.random.Generator, pixels: torch.Tensor, count: int) -> list[ImageChat]:
    """`count` phrasings of one image's question and answer."""
    out = []
    for _ in range(count):
        q, a = QUESTIONS[rng.integers(len(QUESTIONS))], ANSWERS[rng.integers(len(ANSWERS))]
        out.append(ImageChat(pixels, q, a.format(n=label, w=WORDS[label])))
    return out


def read_digit(text: str) -> int | None:
    """The digit an answer names, as a numeral or a word; None when it names none or several."""
    found = {int(d) for d in re.findall(r"\d", text)} | {WORDS.index(w) for w in re.findall(r"[a-z]+", text.lower())
                                                        if w in WORDS}
    return found.pop() if len(found) == 1 else None


def tokenizer_for() -> Tokenizer:
    """A byte-level BPE trained on the phrasings (words become single tokens: 24-token chats, not 57 characters)."""
    texts = QUESTIONS + [a.format(n=d, w=WORDS[d]) for a in ANSWERS for d in range(10)] + ["user", "assistant"] + WORDS
    return Tokenizer.train(texts * 20, vocab_size=400, special_tokens=(*CHATML_SPECIALS, IMAGE_TOKEN))


def lm_for(tokenizer: Tokenizer, d_model: int = 96) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=len(tokenizer), n_layer=2, n_head=4, d_model=d_model, max_seq_len=96,
                                   tie_embeddings=True, d_ff=2 * d_model))


class TextBatches:
    """Stage 0's text-only chats: the image's slot holds what the image shows, in words ("seven", "7"),
    so the small LM learns to answer from what stands in that slot -- what a pretrained LM brings to
    LLaVA and what stage 1 then has to make the image tokens say. For causal_lm_loss."""

    def __init__(self, tokenizer: Tokenizer, batch_size: int, seed: int = 0):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> dict:
        rows = []
        for _ in range(self.batch_size):
            d = int(self.rng.integers(10))
            example = chats(d, self.rng, torch.zeros(0), 1)[0]
            slot = WORDS[d] if self.rng.random() < 0.5 else str(d)
            ids, mask = self.tokenizer.apply_chat_template([{"role": "user", "content": f"{slot}\n{example.question}"},
                                                           {"role": "assistant", "content": example.answer}])
            rows.append((ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]))
        length = max(len(r[0]) for r in rows)
        pad = self.tokenizer.eos_id
        return {"input_ids": torch.tensor([r[0] + [pad] * (length - len(r[0])) for r in rows]),
                "labels": torch.tensor([r[1] + [IGNORE_INDEX] * (length - len(r[1])) for r in rows])}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def loop_config(steps: int, lr: float) -> LoopConfig:
    return LoopConfig(max_steps=steps, lr=lr, warmup_steps=min(50, steps // 10), eval_every=0, save_every=0,
                      log_every=50, precision="fp32", device="cpu", progress=False, weight_decay=0.0)


def answer_all(model: VisionLanguageModel, tokenizer: Tokenizer, pixels: torch.Tensor) -> list[str]:
    prompt = prompt_ids(model, tokenizer, ASK)
    stop = {tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id}
    return [tokenizer.decode(model.generate(prompt, p[None], max_new_tokens=24, stop=stop)) for p in pixels]


def run_arm(mode: str, tokenizer, lm_state, train_rows_of, test_pixels, test_labels, steps: int, out: Path,
            lora_steps: int) -> dict:
    lm = lm_for(tokenizer)
    lm.load_state_dict(lm_state)
    model = VisionLanguageModel(VLMConfig(vision=VISION, mode=mode, image_token_id=tokenizer.token_to_id(IMAGE_TOKEN),
                                          cross_every=1), lm)
    rows = train_rows_of(model)
    data = ImageChatBatches(rows, batch_size=32, pad_id=tokenizer.eos_id, seed=0)
    arm, started = {"mode": mode}, time.perf_counter()
    before = lm.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    if mode == "prefix":
        arm["stage1_trainable"] = set_stage(model, 1, train_encoder=True)
        result = train_stage(model, data, loop_config(steps, 1e-3), out / f"{mode}-stage1")
        arm["stage1_final_loss"] = result.history[-1]["loss"]
        answers = answer_all(model, tokenizer, test_pixels)
        arm["stage1_accuracy"] = float(np.mean([read_digit(a) == y for a, y in zip(answers, test_labels, strict=True)]))
        arm["stage2_trainable"] = set_stage(model, 2, train_encoder=True, lora=LoraConfig(r=8, alpha=16, targets=("q", "v")))
        result = train_stage(model, data, loop_config(lora_steps, 5e-4), out / f"{mode}-stage2")
        merge_lora(model.lm)
    else:
        arm["stage2_trainable"] = set_stage(model, 2, train_encoder=True)
        result = train_stage(model, data, loop_config(steps + lora_steps, 1e-3), out / f"{mode}-stage2")
        arm["gates_tanh"] = {name: [round(float(layer.attn_gate.detach().tanh()), 4), round(float(layer.mlp_gate.detach().tanh()), 4)]
                             for name, layer in model.cross.items()}
    arm["lm_unchanged_outside_lora"] = all(torch.equal(v, model.lm.state_dict()[k]) for k, v in before.items()) \
        if mode == "cross" else None
    arm["stage2_final_loss"] = result.history[-1]["loss"]
    answers = answer_all(model, tokenizer, test_pixels)
    arm["answers"] = answers
    arm["accuracy"] = float(np.mean([read_digit(a) == y for a, y in zip(answers, test_labels, strict=True)]))
    arm["minutes"] = round((time.perf_counter() - started) / 60, 2)
    arm["model"] = model
    return arm


def grid(images, labels, answers, path: Path, n: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 10
    fig, axes = plt.subplots(n // cols, cols, figsize=(cols * 1.3, n // cols * 1.55))
    for ax, image, label, answer in zip(axes.flat, images, labels, answers, strict=False):
        ax.imshow(np.asarray(image), cmap="gray_r")
        right = read_digit(answer) == label
        ax.set_title(answer, fontsize=6.5, color="green" if right else "red")
        ax.axis("off")
    fig.suptitle('Held-out digits: the model\'s answer to "What digit is this?" (red: wrong)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500, help="stage-1 steps (prefix); cross trains steps + lora_steps")
    parser.add_argument("--lora-steps", type=int, default=500)
    parser.add_argument("--lm-steps", type=int, default=600, help="stage 0: text-only pretraining of the small LM")
    parser.add_argument("--phrasings", type=int, default=2, help="captions per training image")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/vision_digits.json"))
    parser.add_argument("--png", default=str(ROOT / "docs/vision_digits.png"))
    parser.add_argument("--save", default=None, help="write the better arm's model and tokenizer here "
                                                     "(for `llmkit generate DIR QUESTION --image PNG`)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.linear_model import LogisticRegression

    images, labels, flat = digit_images()
    train_idx, test_idx = split(len(images), labels)
    baseline = LogisticRegression(max_iter=5000).fit(flat[train_idx], np.array(labels)[train_idx])
    baseline_accuracy = float(baseline.score(flat[test_idx], np.array(labels)[test_idx]))
    print(f"logistic regression: {baseline_accuracy:.4f}")

    processor = ImageProcessor(VISION)
    pixels = processor([images[i] for i in range(len(images))])
    tokenizer = tokenizer_for()
    test_labels = [labels[i] for i in test_idx]
    rng = np.random.default_rng(0)
    train_chats = [c for i in train_idx for c in chats(labels[i], rng, pixels[i], args.phrasings)]

    work = Path(tempfile.mkdtemp(prefix="vision_digits_"))
    lm = lm_for(tokenizer)
    started = time.perf_counter()
    stage0 = train(lm, causal_lm_loss, TextBatches(tokenizer, 32), loop_config(args.lm_steps, 3e-3), work / "lm")
    lm_minutes = (time.perf_counter() - started) / 60
    print(f"stage 0 (text-only LM): loss {stage0.history[-1]['loss']:.3f}")
    lm_state = {k: v.clone() for k, v in lm.state_dict().items()}

    arms = {}
    for mode in ("prefix", "cross"):
        arms[mode] = run_arm(mode, tokenizer, lm_state, lambda m: [encode(m, tokenizer, c) for c in train_chats],
                             pixels[test_idx], test_labels, args.steps, work, args.lora_steps)
        print(f"{mode}: held-out accuracy {arms[mode]['accuracy']:.4f} ({arms[mode]['minutes']} min)")
    best = max(arms, key=lambda m: arms[m]["accuracy"])
    if args.save:
        arms[best]["model"].save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    grid([images[i] for i in test_idx[:30]], test_labels[:30], arms[best]["answers"][:30], Path(args.png))

    result = {
        "task": "answer 'What digit is this?' about held-out sklearn load_digits scans (8x8 upsampled to 32x32)",
        "train_images": len(train_idx), "test_images": len(test_idx), "captions_per_train_image": args.phrasings,
        "baseline_logistic_regression_accuracy": baseline_accuracy,
        "lm": {"config": lm.config.to_dict(), "parameters": lm.num_parameters(), "stage0_steps": args.lm_steps,
               "stage0_final_loss": stage0.history[-1]["loss"], "minutes": round(lm_minutes, 2)},
        "vision": VISION.to_dict(),
        "arms": {m: {k: v for k, v in a.items() if k not in ("model", "answers")}
                 | {"first_answers": a["answers"][:10],
                    "unreadable_answers": sum(read_digit(x) is None for x in a["answers"])}
                 for m, a in arms.items()},
        "grid": str(Path(args.png).relative_to(ROOT)) if Path(args.png).is_relative_to(ROOT) else args.png,
        "grid_arm": best,
        "provenance": provenance("benchmarks/vision_digits.py"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
