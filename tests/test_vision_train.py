"""Training stages on the one loop, the chat template with its image placeholder, VLM folders and
`llmkit generate --image`: a tiny model learns to tell two kinds of image apart with the LM frozen."""

import pytest
import torch
from PIL import Image

from llmkit import commands
from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, DataError
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.peft.lora import LoraConfig
from llmkit.tokenizer import CHATML_SPECIALS, Tokenizer
from llmkit.train.loop import LoopConfig, train
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.vision import (
    IMAGE_TOKEN,
    ImageChat,
    ImageChatBatches,
    encode,
    prompt_ids,
    set_stage,
    train_stage,
)
from llmkit.vision import ImageProcessor, VisionConfig, VisionLanguageModel, VLMConfig
from llmkit.vision.vlm import load_vlm

VISION = VisionConfig(image_size=8, patch_size=4, channels=1, d_model=16, n_layer=1, n_head=2, d_ff=32,
                      image_mean=(0.5,), image_std=(0.5,))


def tokenizer() -> Tokenizer:
    texts = ["Is it bright?", "yes", "no", "user", "assistant"] * 10
    return Tokenizer.train(texts, vocab_size=300, special_tokens=(*CHATML_SPECIALS, IMAGE_TOKEN))


def model(tok: Tokenizer, mode: str = "prefix") -> VisionLanguageModel:
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=len(tok), n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64,
                                 tie_embeddings=True))
    return VisionLanguageModel(VLMConfig(vision=VISION, mode=mode, image_token_id=tok.token_to_id(IMAGE_TOKEN),
                                         cross_every=1), lm)


def images(n: int) -> tuple[list[Image.Image], list[str]]:
    """Half bright images ("yes"), half dark ("no"), with noise."""
    g = torch.Generator().manual_seed(0)
    out, answers = [], []
    for i in range(n):
        bright = i % 2 == 0
        base = 200 if bright else 50
        pixels = (base + 40 * torch.randn(8, 8, generator=g)).clamp(0, 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels, "L"))
        answers.append("yes" if bright else "no")
    return out, answers


class TextOnly:
    """Stage 0's batches: the rows without their pixels, for causal_lm_loss."""

    def __init__(self, batches: ImageChatBatches):
        self.batches = batches

    def next_batch(self) -> dict:
        batch = self.batches.next_batch()
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def test_encode_scores_the_answer_only_and_expands_the_placeholder():
    tok = tokenizer()
    vlm = model(tok)
    row = encode(vlm, tok, ImageChat(torch.zeros(1, 8, 8), "Is it bright?", "yes"))
    ids, labels = row["input_ids"], row["labels"]
    assert ids.count(vlm.config.image_token_id) == VISION.n_patches == 4
    scored = [t for t in labels if t != -100]
    assert tok.decode(scored).strip() == "yes<|im_end|>"


def loop(steps: int, lr: float) -> LoopConfig:
    return LoopConfig(max_steps=steps, lr=lr, warmup_steps=5, eval_every=0, save_every=0, precision="fp32",
                      device="cpu", progress=False, weight_decay=0.0)


def test_stage_one_trains_the_image_path_with_the_lm_frozen(tmp_path):
    """Stage 0 teaches the LM to answer from what stands in the image's slot (the answer word there, as
    text: what a pretrained LM brings); stage 1 trains the encoder and projector with the LM frozen until
    the image tokens say it. Starts at ~ln 2 / 2 (the LM cannot see the image: two scored tokens, one a
    coin flip) and must end near 0, with every answer right."""
    tok = tokenizer()
    vlm = model(tok)
    pics, answers = images(16)
    pixels = ImageProcessor(VISION)(pics)
    rows = [encode(vlm, tok, ImageChat(p, "Is it bright?", a)) for p, a in zip(pixels, answers, strict=True)]
    text_rows = []
    for row, answer in zip(rows, answers, strict=True):
        word, ids = tok.encode(answer)[0], [t for t in row["input_ids"] if t != vlm.config.image_token_id]
        at = row["input_ids"].index(vlm.config.image_token_id)
        ids.insert(at, word)
        cut = len(row["input_ids"]) - len(ids)
        text_rows.append({"input_ids": ids, "labels": row["labels"][cut:], "pixels": row["pixels"]})
    train(vlm.lm, causal_lm_loss, TextOnly(ImageChatBatches(text_rows, 8, tok.eos_id)), loop(300, 3e-3),
          tmp_path / "lm")
    lm_before = {k: v.clone() for k, v in vlm.lm.state_dict().items()}
    counts = set_stage(vlm, 1, train_encoder=True)
    assert counts["lm"] == 0 and counts["projector"] > 0 and counts["encoder"] > 0
    result = train_stage(vlm, ImageChatBatches(rows, 8, tok.eos_id), loop(150, 3e-3), tmp_path / "run")
    assert all(torch.equal(v, vlm.lm.state_dict()[k]) for k, v in lm_before.items())
    assert result.history[0]["loss"] > 0.3 and result.history[-1]["loss"] < 0.05
    prompt = prompt_ids(vlm, tok, "Is it bright?")
    stop = {tok.token_to_id("<|im_end|>")}
    got = [tok.decode(vlm.generate(prompt, p[None], 4, stop)).strip() for p in pixels[:4]]
    assert got == answers[:4]

    # the model folder and `llmkit generate --image` answer the same
    vlm.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    pics[1].save(tmp_path / "dark.png")
    loaded = load_vlm(tmp_path / "vlm")
    assert torch.equal(loaded(torch.tensor([prompt]), pixels[:1]), vlm(torch.tensor([prompt]), pixels[:1]))
    sampling = SamplingParams(max_new_tokens=4)
    assert commands._answer_about_image(str(tmp_path / "vlm"), "Is it bright?", str(tmp_path / "dark.png"),
                                        sampling).strip() == "no"
    with pytest.raises(DataError, match=r"2 image placeholder\(s\).*but 1 image\(s\)"):
        commands._answer_about_image(str(tmp_path / "vlm"), f"{IMAGE_TOKEN} Is it bright?",
                                     str(tmp_path / "dark.png"), sampling)
    Image.new("RGBA", (8, 8)).save(tmp_path / "alpha.png")
    with pytest.raises(DataError, match="mode 'RGBA'"):
        commands._answer_about_image(str(tmp_path / "vlm"), "Is it bright?", str(tmp_path / "alpha.png"), sampling)


def test_stage_two_and_its_errors():
    tok = tokenizer()
    prefix = model(tok)
    with pytest.raises(ConfigError, match="no cross-attention layers, so pass a LoraConfig"):
        set_stage(prefix, 2)
    counts = set_stage(prefix, 2, lora=LoraConfig(r=2, targets=("q", "v")))
    trainable = {n for n, p in prefix.lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable) and counts["encoder"] == 0
    cross = model(tok, "cross")
    with pytest.raises(ConfigError, match="no gradient reaches the projector; start at stage 2"):
        set_stage(cross, 1)
    counts = set_stage(cross, 2)
    assert counts["cross"] > 0 and counts["lm"] == 0
    with pytest.raises(ConfigError, match=r"the tokenizer's <image> is id None"):
        prompt_ids(cross, Tokenizer.train(["a b"] * 5, vocab_size=270), "hi")


@pytest.mark.parametrize("tie", [True, False])
def test_a_pretrained_lm_gets_an_image_token(tie):
    """A tokenizer without `<image>` (a pretrained LM's) gets it as a special token after its vocabulary and
    the LM one row for it, the mean of the old rows (transformers' resize_token_embeddings starts new rows
    there); every old logit is unchanged and the tie holds; shrinking is refused."""
    from llmkit.train.vision import add_image_token

    tok = Tokenizer.train(["Is it bright?", "yes", "no"] * 10, vocab_size=280, special_tokens=CHATML_SPECIALS)
    n = len(tok)
    torch.manual_seed(0)
    lm = Transformer(ModelConfig(vocab_size=n, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=32,
                                 tie_embeddings=tie)).eval()
    ids = torch.tensor([tok.encode("Is it bright? yes")])
    before, embed = lm(ids), lm.embed.weight.detach().clone()
    image_id = add_image_token(lm, tok)
    assert image_id == n and tok.token_to_id(IMAGE_TOKEN) == n and lm.config.vocab_size == n + 1
    assert tok.encode(f"{IMAGE_TOKEN}yes")[0] == n  # matched whole, as a special token
    assert torch.equal(lm.embed.weight[:n], embed) and torch.allclose(lm.embed.weight[n], embed.mean(0))
    assert (lm.lm_head.weight is lm.embed.weight) == tie and lm.lm_head.weight.shape == (n + 1, 16)
    after = lm(ids)
    assert after.shape[-1] == n + 1  # old logits equal up to the matmul's blocking for one more output column
    torch.testing.assert_close(after[..., :n], before, rtol=0, atol=1e-6)
    assert add_image_token(lm, tok) == n and lm.config.vocab_size == n + 1  # already there: nothing changes
    with pytest.raises(ConfigError, match="shrinking would drop trained rows"):
        lm.resize_vocab(n)
    VisionLanguageModel(VLMConfig(vision=VISION, image_token_id=image_id), lm)  # the VLM accepts the new id
