"""Structured pruning: the smaller dense model computes what the original computes with the removed
heads, channels and layers switched off; it saves as an HF folder that transformers reloads to the
same logits, and as a GGUF llmkit reads back; impossible targets are refused."""

import pytest
import torch

from llmkit import ModelConfig, Transformer
from llmkit.errors import ConfigError
from llmkit.quant.structured import importance, prune_structured


def setup(seed=0):
    torch.manual_seed(seed)
    # 6 query heads in 3 GQA groups of 2, so a prune must keep whole pairs
    model = Transformer(ModelConfig.from_preset("llama-tiny", n_layer=3, n_head=6, n_kv_head=3, head_dim=16)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (2, 24), generator=g) for _ in range(2)]
    return model, batches, importance(model, batches)


@torch.no_grad()
def test_pruned_model_equals_the_original_with_the_removed_parts_zeroed():
    model, batches, imp = setup()
    pruned = prune_structured(model, imp, n_head=4, d_ff=100, n_layer=2)
    c = pruned.config
    assert (c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.n_layer) == (4, 2, 16, 100, 2)
    # Reference: zero, in the original, the o_proj columns of dropped heads and the down_proj columns of
    # dropped channels (their outputs then add nothing), and both outputs of a dropped (pre-norm) layer.
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    dropped_layer = int(imp.layers.argmin())
    for i, block in enumerate(ref.blocks):
        if i == dropped_layer:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
            continue
        kept_groups = imp.groups[i].topk(2).indices
        for h in range(6):
            if h // 2 not in kept_groups:
                block.attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
        drop = imp.channels[i].topk(192 - 100, largest=False).indices
        block.mlp.down_proj.weight[:, drop] = 0
    ids = batches[0]
    # same arithmetic up to summation order over fewer terms: fp32 rounding, ~1e-6 of logits of size ~1
    torch.testing.assert_close(pruned(ids), ref(ids), rtol=0, atol=2e-5)
    assert pruned.num_parameters() < model.num_parameters()


@torch.no_grad()
def test_keeping_everything_is_the_identity():
    model, batches, imp = setup()
    same = prune_structured(model, imp)
    torch.testing.assert_close(same(batches[0]), model(batches[0]), rtol=0, atol=0)


@torch.no_grad()
def test_a_pruned_model_saved_as_hf_reloads_identically_into_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model, batches, imp = setup()
    pruned = prune_structured(model, imp, n_head=2, d_ff=64, n_layer=2)
    pruned.save_pretrained(tmp_path / "pruned")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", torch_dtype=torch.float32).eval()
    assert hf.config.num_attention_heads == 2 and hf.config.num_key_value_heads == 1 and hf.config.head_dim == 16
    ids = batches[1]
    # the same weights and fp32 arithmetic in another implementation: rounding only
    torch.testing.assert_close(hf(ids).logits, pruned(ids), rtol=0, atol=1e-5)
    again = Transformer.from_pretrained(tmp_path / "pruned")
    torch.testing.assert_close(again(ids), pruned(ids), rtol=0, atol=0)


@pytest.mark.parametrize("n_head, message", [
    (0, r"n_head=0 would leave zero attention heads in every layer; expected 1\.\.6"),
    (3, r"n_head=3 breaks GQA grouping: each of the 3 key/value heads serves 2 query heads, so expected a "
        r"multiple of 2 up to 6"),
    (8, r"n_head=8 breaks GQA grouping"),
])
def test_impossible_head_targets_are_refused(n_head, message):
    model, _, imp = setup()
    with pytest.raises(ConfigError, match=message):
        prune_structured(model, imp, n_head=n_head)


def test_impossible_width_and_depth_targets_are_refused():
    model, _, imp = setup()
    with pytest.raises(ConfigError, match=r"d_ff=500; expected 1\.\.192"):
        prune_structured(model, imp, d_ff=500)
    with pytest.raises(ConfigError, match=r"n_layer=4; expected 1\.\.3"):
        prune_structured(model, imp, n_layer=4)
