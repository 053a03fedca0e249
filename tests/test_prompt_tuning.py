"""Prompt tuning: only the virtual tokens train; peft loads our prompt and gives our logits."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.peft.prompt_tuning import PromptTuning, load_prompt, save_prompt
from llmkit.train.objectives import causal_lm_loss

IDS = torch.randint(1, 512, (2, 10), generator=torch.Generator().manual_seed(1))


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("llama-tiny")).eval()


def test_only_the_prompt_trains_and_lowers_the_loss():
    tuned = PromptTuning(tiny(), num_virtual_tokens=4)
    before = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-1)
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == 4 * 64
    batch = (IDS[:, :-1], IDS[:, 1:])
    losses = []
    for _ in range(5):
        loss, _ = causal_lm_loss(tuned, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in tuned.model.state_dict().items())
    # the prompt really is in front: the real positions see it, so logits differ from the bare model
    with torch.no_grad():
        assert tuned(IDS).shape == tuned.model(IDS).shape
        assert (tuned(IDS) - tuned.model(IDS)).abs().max() > 1e-3


def test_peft_loads_our_prompt(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "base")
    tuned = PromptTuning(model, num_virtual_tokens=3, seed=5)
    save_prompt(tuned, tmp_path / "prompt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "prompt").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits[:, 3:]  # peft returns the virtual positions too
        torch.testing.assert_close(theirs, tuned(IDS), rtol=0, atol=1e-5)
        again = load_prompt(tiny(), tmp_path / "prompt")
        torch.testing.assert_close(again(IDS), tuned(IDS), rtol=0, atol=1e-6)


def test_bad_size():
    with pytest.raises(ConfigError, match="num_virtual_tokens must be a positive integer, got 0"):
        PromptTuning(tiny(), 0)
