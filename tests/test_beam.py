"""Beam search gives transformers' tokens and scores, alone and batched."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llmkit
from llmkit import Transformer
from llmkit.errors import ConfigError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        hf.lm_head.weight[2] = 0.97 * hf.lm_head.weight[49]  # EOS: a near-twin of a likely token
    path = tmp_path_factory.mktemp("beam")
    hf.save_pretrained(path)
    return hf, Transformer.from_pretrained(path)


def _hf(hf, prompt, **kw):
    with torch.no_grad():
        out = hf.generate(prompt, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, out.sequences_scores


@pytest.mark.parametrize("kw", [
    dict(num_beams=4, max_new_tokens=64, min_new_tokens=64),  # no EOS: the full length
    dict(num_beams=3, max_new_tokens=40, length_penalty=1.0, early_stopping=False),
    dict(num_beams=3, max_new_tokens=40, length_penalty=0.5, early_stopping=True),
    dict(num_beams=4, max_new_tokens=40, length_penalty=2.0, early_stopping="never", num_return_sequences=2),
], ids=["64-tokens", "lp1", "lp0.5-early", "lp2-never-n2"])
def test_beam_search_is_token_identical_to_transformers(pair, kw):
    hf, ours = pair
    prompt = torch.tensor([[5, 17, 33, 3, 42, 7]])
    expected, scores = _hf(hf, prompt, **kw)
    ours_kw = dict(kw)
    n = ours_kw.pop("num_return_sequences", 1)
    if "min_new_tokens" in ours_kw:
        ours_kw["min_tokens"] = ours_kw.pop("min_new_tokens")
    outs = llmkit.generate(ours, None, prompt[0].tolist(), n=n, **ours_kw)
    outs = outs if isinstance(outs, list) else [outs]
    for i, o in enumerate(outs):
        row = expected[i, 6:].tolist()
        assert o.token_ids == row[:len(o.token_ids)]
        assert all(t == 2 for t in row[len(o.token_ids):])  # transformers pads with EOS
    torch.testing.assert_close(torch.tensor([o.score for o in outs]), scores, rtol=0, atol=1e-4)


def test_beam_search_hits_eos_in_some_configuration(pair):
    """Guard for the tests above: EOS (id 2) must actually end some beams, or they test less."""
    hf, _ = pair
    expected, _ = _hf(hf, torch.tensor([[5, 17, 33, 3, 42, 7]]), num_beams=3, max_new_tokens=40)
    assert (expected[0, 6:] == 2).any()


def test_batched_beams_equal_one_by_one(pair):
    _, ours = pair
    prompts = [[5, 17, 33, 3, 42, 7], [9, 9, 4], [11, 12, 13, 14]]
    batched = llmkit.generate(ours, None, prompts, num_beams=3, max_new_tokens=20, min_tokens=20)
    alone = [llmkit.generate(ours, None, p, num_beams=3, max_new_tokens=20, min_tokens=20) for p in prompts]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]


def test_beam_search_rejects_stream_and_too_many_returns(pair):
    _, ours = pair
    with pytest.raises(ConfigError, match="beam"):
        list(llmkit.stream(ours, None, [1, 2], num_beams=2))
    with pytest.raises(ConfigError, match="num_beams"):
        llmkit.generate(ours, None, [1, 2], num_beams=2, n=3)


@pytest.mark.slow
def test_smollm2_greedy_and_beam_are_token_identical_to_transformers(tmp_path):
    """The real SmolLM2-135M-Instruct weights (dequantized from its GGUF), 64 new tokens each way."""
    model, tok = llmkit.load("smollm2-135m-instruct")  # fetched once; a broken loader fails here, never skips
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    prompt = torch.tensor([ids])
    for kw in (dict(num_beams=1), dict(num_beams=3)):
        with torch.no_grad():
            expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=64, min_new_tokens=64, **kw)[0, len(ids):].tolist()
        got = llmkit.generate(model, tok, ids, temperature=0, max_new_tokens=64, min_tokens=64, **kw)
        assert got.token_ids == expected, kw
