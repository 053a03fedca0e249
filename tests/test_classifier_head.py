"""The sequence-classification / reward head equals transformers' *ForSequenceClassification in both
directions (fp32, atol 1e-5), and pools each row's last real token whatever the padding."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from llmkit import ModelConfig, Transformer
from llmkit.errors import ConfigError

ATOL = 1e-5
PAD = 0


def hf_llama_classifier(num_labels, tie):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie, num_labels=num_labels, pad_token_id=PAD)
    return LlamaForSequenceClassification(config).eval()


def hf_gpt2_classifier(num_labels, tie=True):
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        num_labels=num_labels, pad_token_id=PAD)
    return GPT2ForSequenceClassification(config).eval()


def right_padded_batch():
    """Three rows of real tokens (never the pad id) of lengths 9, 5 and 12, padded on the right."""
    g = torch.Generator().manual_seed(3)
    lengths = [9, 5, 12]
    ids = torch.full((3, 12), PAD)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, 256, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("make,num_labels,tie", [(hf_llama_classifier, 3, False), (hf_llama_classifier, 1, True),
                                                 (hf_gpt2_classifier, 5, True)],
                         ids=["llama-3-classes", "llama-reward-tied", "gpt2-5-classes"])
def test_transformers_classifier_loads_with_same_scores(tmp_path, make, num_labels, tie):
    hf = make(num_labels, tie)
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.num_labels == num_labels
    ids, mask = right_padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours.classify(ids, mask), expected, rtol=0, atol=ATOL)


def test_llmkit_classifier_loads_in_transformers(tmp_path):
    config = ModelConfig.from_preset("llama-tiny", vocab_size=256, num_labels=2, pad_token_id=PAD)
    ours = Transformer(config).eval()
    ours.save_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(hf, LlamaForSequenceClassification)
    ids, mask = right_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.classify(ids, mask), hf(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=ATOL)


def test_left_and_right_padding_give_each_rows_own_score():
    model = Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=256, num_labels=3)).eval()
    ids, mask = right_padded_batch()
    lengths = mask.sum(1).tolist()
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row, n in enumerate(lengths):
        left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
    with torch.no_grad():
        alone = torch.cat([model.classify(ids[row:row + 1, :n]) for row, n in enumerate(lengths)])
        torch.testing.assert_close(model.classify(ids, mask), alone, rtol=0, atol=ATOL)
        torch.testing.assert_close(model.classify(left_ids, left_mask), alone, rtol=0, atol=ATOL)


def test_heads_say_what_is_missing():
    lm = Transformer(ModelConfig.from_preset("llama-tiny"))
    with pytest.raises(ConfigError, match="no classification head"):
        lm.classify(torch.tensor([[1, 2]]))
    classifier = Transformer(ModelConfig.from_preset("llama-tiny", num_labels=2, tie_embeddings=False))
    with pytest.raises(ConfigError, match="classifier .* without an LM head"):
        classifier(torch.tensor([[1, 2]]))
    with pytest.raises(ConfigError, match="num_labels"):
        ModelConfig.from_preset("llama-tiny", num_labels=-1)
