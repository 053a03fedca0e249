"""BERT-style encoders as config fields of the one model: parity with transformers' BertForMaskedLM and
BertForSequenceClassification (and RoFormer's, BERT with rotary positions) in fp32, both directions
(their folders read by llmkit, ours read by transformers), on tiny random models whose norms and biases
are moved off their initial values and whose batches are padded and carry token types; and the
encoder's clear errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from llmkit import ConfigError, FormatError, ModelConfig, Transformer
from llmkit.formats import hf
from llmkit.generate import generate_tensor

VOCAB = 97


def _bert_config(config_class=transformers.BertConfig, **changes) -> transformers.BertConfig:
    return config_class(**{**dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12), **changes})


def _random(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:
                continue  # RoFormer's sinusoid table: a formula, not a weight
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)  # perturbed norms: a swapped or missing LayerNorm cannot hide
            else:
                p.normal_(0.0, 0.1)
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as BERT batches are padded
    mask[2, 5:] = 0
    types = torch.randint(0, 2, (3, 12), generator=g)
    return ids, mask, types


# fp32 with the same math in another order: measured max |diff| 6e-7 (MLM logits), 6e-8 (class logits).
TOL = dict(atol=1e-5, rtol=0)


ENCODERS = {"bert": (transformers.BertConfig, transformers.BertForMaskedLM, transformers.BertForSequenceClassification),
            "roformer": (transformers.RoFormerConfig, transformers.RoFormerForMaskedLM,
                         transformers.RoFormerForSequenceClassification)}


@pytest.mark.parametrize("family, head", [(f, h) for f in ENCODERS for h in ("mlm", "classify")])
def test_parity_both_directions(family, head, tmp_path):
    config_class, masked, classifier = ENCODERS[family]
    cls = classifier if head == "classify" else masked
    config = _bert_config(config_class, **(dict(num_labels=3) if head == "classify" else {}))
    reference = _random(cls, config)
    reference.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf")
    assert not ours.config.causal and ours.config.hf_model_type == family
    ids, mask, types = _batch()
    real = mask.bool()

    def run(model):
        return model.classify(ids, mask, types) if model.score is not None else model(ids, mask,
                                                                                       token_type_ids=types)

    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = run(ours)
    if want.dim() == 3:  # MLM training runs the head at the chosen positions only: the same logits there
        chosen = torch.full_like(ids, -100)
        chosen[0, 3], chosen[1, 0], chosen[2, 4] = 5, 6, 7
        with torch.no_grad():
            scored = ours(ids, mask, labels=chosen, token_type_ids=types, scored_logits=True)
        torch.testing.assert_close(scored, want[chosen != -100], **TOL)
    if want.dim() == 3:  # padded positions are not compared: transformers computes them, nobody reads them
        want, got = want[real], got[real]
    torch.testing.assert_close(got, want, **TOL)

    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == [cls.__name__]
    back = cls.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(again[real] if again.dim() == 3 else again, got, **TOL)


def test_encoder_is_bidirectional_and_padding_free():
    """A later token changes an earlier token's output (not causal); each row equals itself unpadded."""
    model = Transformer.from_state_dict(*_ours_from(transformers.BertForMaskedLM))
    ids, mask, types = _batch()
    with torch.no_grad():
        full = model(ids, mask, token_type_ids=types)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % VOCAB
        assert (model(changed, mask, token_type_ids=types)[0, 0] - full[0, 0]).abs().max() > 1e-3
        row = model(ids[2:, :5], token_type_ids=types[2:, :5])[0]
    torch.testing.assert_close(full[2, :5], row, **TOL)


def _ours_from(cls):
    """(config, tensors) of a random transformers model, read through its saved folder."""
    folder = Path(tempfile.mkdtemp())
    _random(cls, _bert_config()).save_pretrained(folder)
    return hf.load_checkpoint(folder)


def test_bert_model_folder_without_prefix_reads(tmp_path):
    """sentence-transformers' BertModel folders store names without `bert.`; the pooler comes along."""
    reference = _random(transformers.BertModel, _bert_config())
    reference.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.pooler and not ours.config.mlm_head
    ids, mask, types = _batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours.hidden_states(ids, mask, token_type_ids=types)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)


def test_an_encoder_cannot_generate():
    model = Transformer.from_state_dict(*_ours_from(transformers.BertForMaskedLM))
    with pytest.raises(ConfigError, match="encoder.*cannot generate"):
        generate_tensor(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2)


@pytest.mark.parametrize("changes, message", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(architectures=["BertForPreTraining"]), "BertForPreTraining"),
])
def test_unsupported_bert_configs_are_refused_by_name(changes, message, tmp_path):
    _random(transformers.BertForMaskedLM, _bert_config()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(FormatError, match=message):
        Transformer.from_pretrained(tmp_path)


def test_roformer_files_that_rotate_otherwise_are_refused(tmp_path):
    """RoFormer's rotation is a formula: a stored table that differs from it, or rotated values, is refused."""
    reference = _random(transformers.RoFormerForMaskedLM, _bert_config(transformers.RoFormerConfig))
    with torch.no_grad():
        reference.roformer.encoder.embed_positions.weight[3] += 0.5
    reference.save_pretrained(tmp_path / "table")
    with pytest.raises(FormatError, match="sinusoidal position table"):
        Transformer.from_pretrained(tmp_path / "table")
    _random(transformers.RoFormerForMaskedLM, _bert_config(transformers.RoFormerConfig)).save_pretrained(tmp_path / "v")
    path = tmp_path / "v" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rotary_value": True}))
    with pytest.raises(FormatError, match="rotary_value"):
        Transformer.from_pretrained(tmp_path / "v")


def test_encoder_config_errors():
    with pytest.raises(ConfigError, match="pooling"):
        ModelConfig(pooling="max")
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig(causal=False, sliding_window=8)


# ---- fine-tuning an encoder as a classifier ------------------------------------------------------


@pytest.mark.parametrize("preset", ["bert-2m", "roformer-2m"])
def test_finetune_classify_on_an_encoder(preset, tmp_path):
    """`finetune --task classify` on an MLM encoder: the [CLS]-framed texts, BERT's pooler and biased head
    (RoFormer's classifier head); it learns a separable task, and the checkpoint is a
    *ForSequenceClassification that transformers runs to the same logits."""
    from llmkit.tokenizer import ENCODER_SPECIALS, Tokenizer
    from llmkit.train import finetune
    from llmkit.train.finetune import FinetuneConfig

    words = {0: ["rain", "cold", "grey", "dark"], 1: ["sun", "warm", "blue", "bright"]}
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(160):
        label = i % 2
        picks = [words[label][int(j)] for j in torch.randint(0, 4, (3,), generator=g)]
        filler = ["the", "day", "was", "and", "very"]
        rows.append({"text": " ".join(picks[:1] + filler[: 1 + i % 4] + picks[1:]), "label": label})
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = Tokenizer.train([r["text"] for r in rows], vocab_size=300, special_tokens=ENCODER_SPECIALS,
                                bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]", chat_template=None)
    tokenizer.frame_as_encoder()
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, n_layer=2, d_model=64,
                                        d_ff=128, max_seq_len=64)).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    config = FinetuneConfig(model=str(tmp_path / "mlm"), data=str(tmp_path / "cls.jsonl"), task="classify",
                            method="full", max_steps=40, lr=1e-3, batch_size=16, eval_every=0, val_fraction=0.25,
                            out_dir=str(tmp_path / "run"), progress=False, seed=0)
    result = finetune.run(config)
    assert result.report["val_accuracy"] >= 0.9  # chance is 0.5; measured 1.0

    folder = Path(result.last_checkpoint)
    classifier = ENCODERS[preset.split("-")[0]][2]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [classifier.__name__]
    ours = Transformer.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode("sun and the warm day", add_special_tokens=True)])
    assert ids[0, 0] == tokenizer.token_to_id("[CLS]")
    reference = classifier.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.classify(ids), reference(input_ids=ids).logits, **TOL)


def test_finetune_sft_refuses_an_encoder(tmp_path):
    from llmkit.train import finetune
    from llmkit.train.finetune import FinetuneConfig

    model = Transformer.from_state_dict(*_ours_from(transformers.BertForMaskedLM))
    model.save_pretrained(tmp_path / "mlm")
    from llmkit.tokenizer import Tokenizer

    Tokenizer.train_chars(["a b c"]).save_pretrained(tmp_path / "mlm")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(ConfigError, match="is an encoder"):
        finetune.run(FinetuneConfig(model=str(tmp_path / "mlm"), data=str(tmp_path / "sft.jsonl"), task="sft",
                                    method="full", out_dir=str(tmp_path / "run"), progress=False))


def test_scoring_and_accounting_know_an_encoder():
    """Perplexity would let an encoder read the token it predicts: refused; `llmkit info` counts no KV cache."""
    from llmkit.analysis.accounting import model_summary
    from llmkit.eval.perplexity import perplexity
    from llmkit.tokenizer import Tokenizer

    config = ModelConfig.from_preset("bert-2m", vocab_size=300)
    with pytest.raises(ConfigError, match="encoder.*causal LM"):
        perplexity(Transformer(config), Tokenizer.train_chars(["some text"]), "some text")
    summary = model_summary(config)
    assert set(summary["kv_cache_bytes"].values()) == {0}
    assert summary["non_embedding_parameters"] == summary["parameters"] - (300 + 512 + 2) * 128
