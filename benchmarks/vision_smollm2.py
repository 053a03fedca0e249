"""SmolLM2-135M-Instruct learns to see: a ViT trained here, a projector, and LoRA on the frozen language model
answer "What digit is this?" about real handwritten digits and caption real photographs (LLaVA's recipe).

Data, all shipped in packages:
- digits: scikit-learn's `load_digits` (1,797 real 8x8 scans), the split of benchmarks/vision_digits.py
  (80/20 stratified, seed 0), grey repeated over RGB and upsampled to 32x32 by the image processor;
- photos: the 21 photographs and scans that scikit-image ships in `skimage.data` (the astronaut, Chelsea the
  cat, a coffee cup, Greek coins, a rocket launch, the moon, ...), each captioned from its own docstring (the
  package's metadata) in several phrasings. A photo's training views and held-out views are different random
  crops (half to all of its area) and flips of it: the held-out question is whether the model names what a
  view it never saw shows.

The language model: SmolLM2-135M-Instruct (fp32 from its GGUF), frozen throughout, with `<image>` added to
its tokenizer (one new row, `add_image_token`) and its own chat template. Stages:
  0. the ViT (from scratch) learns the images' classes (10 digits, 21 photos) through a linear head on the
     mean of the patch features the projector will read: the pretrained image encoder LLaVA starts from;
  1. the projector alone learns to put those features where SmolLM2 reads them (ViT and LM frozen);
  2. + LoRA r=8 on SmolLM2's q and v.
Baselines on the same images: logistic regression on the pixels, and stage 0's own classifier.

    python benchmarks/vision_smollm2.py     # results/vision_smollm2.json, docs/vision_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from vision_digits import ANSWERS, QUESTIONS, WORDS, digit_images, read_digit, split  # noqa: E402

import llmkit  # noqa: E402
from llmkit.peft.lora import LoraConfig, merge_lora  # noqa: E402
from llmkit.train.loop import LoopConfig, train  # noqa: E402
from llmkit.train.vision import (  # noqa: E402
    ImageChat,
    ImageChatBatches,
    add_image_token,
    encode,
    prompt_ids,
    set_stage,
    train_stage,
)
from llmkit.vision import ImageProcessor, VisionConfig, VisionLanguageModel, VLMConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LM = "smollm2-135m-instruct"
VISION = VisionConfig(image_size=32, patch_size=8, channels=3, d_model=96, n_layer=3, n_head=4, d_ff=192,
                      norm_eps=1e-6, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
# skimage.data loader -> (what its docstring says it shows, the word a caption must contain)
PHOTOS = {
    "astronaut": ("the astronaut Eileen Collins", "astronaut"), "camera": ("a man with a camera", "camera"),
    "cat": ("Chelsea the cat", "cat"), "coffee": ("a coffee cup", "coffee"),
    "coins": ("Greek coins from Pompeii", "coins"), "rocket": ("a rocket launch", "rocket"),
    "moon": ("the surface of the moon", "moon"), "horse": ("the silhouette of a horse", "horse"),
    "hubble_deep_field": ("galaxies of the Hubble deep field", "galax"), "retina": ("a human retina", "retina"),
    "text": ("printed text", "text"), "page": ("a scanned page", "page"), "brick": ("a brick wall", "brick"),
    "grass": ("grass", "grass"), "gravel": ("gravel", "gravel"), "logo": ("the scikit-image logo", "logo"),
    "immunohistochemistry": ("stained tissue under a microscope", "tissue"),
    "cell": ("a cell floating in saline", "cell"), "clock": ("a motion-blurred clock", "clock"),
    "colorwheel": ("a color wheel", "wheel"), "checkerboard": ("a checkerboard", "checkerboard"),
}
PHOTO_QUESTIONS = ["What is in this picture?", "Describe this image.", "What does this photo show?"]
CAPTIONS = ["It shows {x}.", "This is a photo of {x}.", "A picture of {x}."]
DIGIT_ASK, PHOTO_ASK = QUESTIONS[0], PHOTO_QUESTIONS[0]


def photo(name: str) -> Image.Image:
    """One skimage.data image as 8-bit RGB (a boolean silhouette as black and white, RGBA over white)."""
    import skimage.data

    x = getattr(skimage.data, name)()
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    image = Image.fromarray(x)
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        image = white
    return image.convert("RGB")


def views(image: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """`count` random crops (half to all of the area, aspect 3:4 to 4:3), each flipped with probability 1/2."""
    w, h = image.size
    out = []
    for _ in range(count):
        area = rng.uniform(0.5, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(round((area * aspect) ** 0.5))), min(h, int(round((area / aspect) ** 0.5)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = image.crop((x, y, x + cw, y + ch))
        out.append(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view)
    return out


def digit_chat(label: int, pixels: torch.Tensor, rng: np.random.Generator) -> ImageChat:
    q, a = QUESTIONS[rng.integers(len(QUESTIONS))], ANSWERS[rng.integers(len(ANSWERS))]
    return ImageChat(pixels, q, a.format(n=label, w=WORDS[label]))


def photo_chat(name: str, pixels: torch.Tensor, rng: np.random.Generator) -> ImageChat:
    q, a = PHOTO_QUESTIONS[rng.integers(len(PHOTO_QUESTIONS))], CAPTIONS[rng.integers(len(CAPTIONS))]
    return ImageChat(pixels, q, a.format(x=PHOTOS[name][0]))


def names_photo(answer: str, name: str) -> bool:
    """A caption is right when it has the photo's word and no other photo's."""
    text = answer.lower()
    return PHOTOS[name][1] in text and not any(k in text for n, (_, k) in PHOTOS.items() if n != name)


class Classifier(nn.Module):
    """Stage 0: the ViT's mean patch feature (of the layer the projector reads) -> the image's class."""

    def __init__(self, encoder, classes: int, layer: int):
        super().__init__()
        self.encoder, self.layer = encoder, layer
        self.head = nn.Linear(encoder.config.d_model, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(pixels, self.layer)[:, 1:].mean(1))


class ClassBatches:
    """Random batches of (pixels, class) for stage 0, resumable like every loop's data."""

    def __init__(self, pixels: torch.Tensor, classes: torch.Tensor, batch_size: int, seed: int = 0):
        self.pixels, self.classes, self.batch_size = pixels, classes, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        i = torch.randint(len(self.classes), (self.batch_size,), generator=self.generator)
        return self.pixels[i], self.classes[i]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def save_tensors(path: Path, state: dict) -> None:
    """Stage 0's checkpoint: the classifier's tensors as safetensors (it is no HF model)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path / "model.safetensors"))


def class_loss(model, batch):
    loss = F.cross_entropy(model(batch[0]), batch[1])
    return loss, {"loss": loss.detach()}


def loop_config(steps: int, lr: float) -> LoopConfig:
    return LoopConfig(max_steps=steps, lr=lr, warmup_steps=max(1, min(50, steps // 10)), eval_every=0, save_every=0,
                      log_every=25, precision="fp32", device="cpu", progress=True, weight_decay=0.0)


def answer_all(model, tokenizer, pixels: torch.Tensor, question: str) -> list[str]:
    prompt = prompt_ids(model, tokenizer, question)
    stop = {tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id}
    return [tokenizer.decode(model.generate(prompt, p[None], max_new_tokens=20, stop=stop)).strip() for p in pixels]


def evaluate(model, tokenizer, digit_pixels, digit_labels, photo_pixels, photo_names) -> dict:
    digits = answer_all(model, tokenizer, digit_pixels, DIGIT_ASK)
    photos = answer_all(model, tokenizer, photo_pixels, PHOTO_ASK)
    return {"digit_accuracy": float(np.mean([read_digit(a) == y for a, y in zip(digits, digit_labels, strict=True)])),
            "photo_accuracy": float(np.mean([names_photo(a, n) for a, n in zip(photos, photo_names, strict=True)])),
            "digit_answers": digits, "photo_answers": photos}


def grid(images, titles, right, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 6
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.4))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title, ok in zip(axes.flat, images, titles, right, strict=False):
        ax.imshow(np.asarray(image))
        ax.set_title(title, fontsize=7, color="green" if ok else "red", wrap=True)
    fig.suptitle("Held-out images and SmolLM2's answers after LoRA (red: wrong)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision-steps", type=int, default=1500, help="stage 0: the ViT as a classifier")
    parser.add_argument("--projector-steps", type=int, default=200, help="stage 1")
    parser.add_argument("--lora-steps", type=int, default=150, help="stage 2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-views", type=int, default=48, help="training crops per photo")
    parser.add_argument("--test-views", type=int, default=8, help="held-out crops per photo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/vision_smollm2.json"))
    parser.add_argument("--png", default=str(ROOT / "docs/vision_smollm2.png"))
    args = parser.parse_args()
    record = provenance("benchmarks/vision_smollm2.py")  # before anything runs: the commit measured
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from sklearn.linear_model import LogisticRegression

    processor = ImageProcessor(VISION)
    digits, labels, _ = digit_images()
    train_idx, test_idx = split(len(digits), labels)
    digit_pixels = processor([d.convert("RGB") for d in digits])
    rng = np.random.default_rng(0)
    names = list(PHOTOS)
    originals = {n: photo(n) for n in names}
    train_views = {n: views(originals[n], args.train_views, rng) for n in names}
    test_views = {n: views(originals[n], args.test_views, np.random.default_rng(1)) for n in names}
    photo_train = processor([v for n in names for v in train_views[n]])
    photo_train_names = [n for n in names for _ in range(args.train_views)]
    photo_test = processor([v for n in names for v in test_views[n]])
    photo_test_names = [n for n in names for _ in range(args.test_views)]
    test_labels = [labels[i] for i in test_idx]

    # baselines: logistic regression on the pixels the ViT sees
    flat = lambda t: t.reshape(len(t), -1).numpy()  # noqa: E731
    baseline = {
        "digits": float(LogisticRegression(max_iter=5000).fit(flat(digit_pixels[train_idx]), np.array(labels)[train_idx])
                        .score(flat(digit_pixels[test_idx]), test_labels)),
        "photos": float(LogisticRegression(max_iter=5000).fit(flat(photo_train), photo_train_names)
                        .score(flat(photo_test), photo_test_names)),
    }
    print(f"logistic regression: digits {baseline['digits']:.4f}, photos {baseline['photos']:.4f}")

    lm, tokenizer = llmkit.load(LM, dtype=torch.float32)
    image_id = add_image_token(lm, tokenizer)
    model = VisionLanguageModel(VLMConfig(vision=VISION, mode="prefix", image_token_id=image_id, feature_layer=-1), lm)
    work = Path(tempfile.mkdtemp(prefix="vision_smollm2_"))
    timings = {}

    # stage 0: the image encoder learns the 31 classes
    started = time.perf_counter()
    classes = torch.tensor([labels[i] for i in train_idx] + [10 + names.index(n) for n in photo_train_names])
    classifier = Classifier(model.encoder, 10 + len(names), model.config.feature_layer)
    train(classifier, class_loss, ClassBatches(torch.cat([digit_pixels[train_idx], photo_train]), classes, 64),
          loop_config(args.vision_steps, 2e-3), work / "vision", save_weights=save_tensors)
    classifier.eval()
    with torch.no_grad():
        guess = classifier(torch.cat([digit_pixels[test_idx], photo_test])).argmax(-1)
    truth = torch.tensor(test_labels + [10 + names.index(n) for n in photo_test_names])
    n_digits = len(test_idx)
    baseline["vit_classifier_digits"] = float((guess[:n_digits] == truth[:n_digits]).float().mean())
    baseline["vit_classifier_photos"] = float((guess[n_digits:] == truth[n_digits:]).float().mean())
    timings["stage0_minutes"] = (time.perf_counter() - started) / 60
    print(f"stage 0 classifier: digits {baseline['vit_classifier_digits']:.4f}, photos "
          f"{baseline['vit_classifier_photos']:.4f}")

    chats = [digit_chat(labels[i], digit_pixels[i], rng) for i in train_idx]
    chats += [photo_chat(n, p, rng) for n, p in zip(photo_train_names, photo_train, strict=True)]
    rows = [encode(model, tokenizer, c) for c in chats]
    data = ImageChatBatches(rows, batch_size=args.batch_size, pad_id=tokenizer.eos_id, seed=0)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    stages = {}

    started = time.perf_counter()
    trainable = set_stage(model, 1, train_encoder=False)
    result = train_stage(model, data, loop_config(args.projector_steps, 1e-3), work / "stage1")
    timings["stage1_minutes"] = (time.perf_counter() - started) / 60
    stages["stage1"] = {"trainable": trainable, "steps": args.projector_steps, "final_loss": result.history[-1]["loss"],
                        **evaluate(model, tokenizer, digit_pixels[test_idx], test_labels, photo_test, photo_test_names)}
    print(f"stage 1: digits {stages['stage1']['digit_accuracy']:.4f}, photos {stages['stage1']['photo_accuracy']:.4f}")
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items()), "stage 1 moved the LM"

    started = time.perf_counter()
    trainable = set_stage(model, 2, train_encoder=False, lora=LoraConfig(r=8, alpha=16, targets=("q", "v")))
    result = train_stage(model, data, loop_config(args.lora_steps, 5e-4), work / "stage2")
    merge_lora(model.lm)
    timings["stage2_minutes"] = (time.perf_counter() - started) / 60
    stages["stage2"] = {"trainable": trainable, "steps": args.lora_steps, "final_loss": result.history[-1]["loss"],
                        **evaluate(model, tokenizer, digit_pixels[test_idx], test_labels, photo_test, photo_test_names)}
    print(f"stage 2: digits {stages['stage2']['digit_accuracy']:.4f}, photos {stages['stage2']['photo_accuracy']:.4f}")

    # the grid: 12 held-out digits and one held-out view of each photo
    last = stages["stage2"]
    shown = [(digits[test_idx[i]].convert("RGB"), last["digit_answers"][i], read_digit(last["digit_answers"][i])
              == test_labels[i]) for i in range(12)]
    shown += [(test_views[n][0], last["photo_answers"][k * args.test_views], names_photo(
        last["photo_answers"][k * args.test_views], n)) for k, n in enumerate(names)]
    grid(*zip(*shown, strict=True), path=Path(args.png))

    result = {
        "task": "SmolLM2-135M-Instruct, frozen, answers 'What digit is this?' about held-out sklearn digits and "
                "'What is in this picture?' about held-out crops of skimage.data's photographs",
        "lm": LM, "image_token_id": image_id, "vision": VISION.to_dict(),
        "train": {"digit_images": len(train_idx), "photos": len(names), "views_per_photo": args.train_views,
                  "chats": len(chats), "batch_size": args.batch_size},
        "test": {"digit_images": len(test_idx), "photo_views": len(photo_test_names)},
        "stage0": {"steps": args.vision_steps, "batch_size": 64},
        "baselines": baseline,
        "stages": {s: {k: v for k, v in d.items() if not k.endswith("_answers")}
                   | {"first_digit_answers": d["digit_answers"][:10],
                      "photo_answers_first_view": {n: d["photo_answers"][k * args.test_views]
                                                   for k, n in enumerate(names)},
                      "unreadable_digit_answers": sum(read_digit(a) is None for a in d["digit_answers"])}
                   for s, d in stages.items()},
        "minutes": {k: round(v, 2) for k, v in timings.items()},
        "grid": str(Path(args.png).relative_to(ROOT)) if Path(args.png).is_relative_to(ROOT) else args.png,
        "provenance": record,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
