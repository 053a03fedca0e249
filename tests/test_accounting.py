"""Accounting from configs alone: the published parameter counts to the parameter, the 84 GB of a 7B
full fine-tune, FLOPs as 6N + attention, KV cache per token and 12·n_layer·d², each by hand."""

import json

import pytest

from llmkit.analysis.accounting import model_summary
from llmkit.analysis.published import (
    PUBLISHED,
    TEXTBOOK_7B_FULL_FINETUNE_BYTES,
    accounting_rows,
    render_tables,
)
from llmkit.cli import main
from llmkit.config import PRESETS


def test_published_counts_to_the_parameter():
    rows = {r["name"]: r for r in accounting_rows()}
    assert rows["gpt2"]["parameters"] == 124_439_808
    assert rows["llama-2-7b"]["parameters"] == 6_738_415_616
    assert rows["llama-2-70b"]["parameters"] == 68_976_648_192
    assert all(r["parameters"] == PUBLISHED[r["name"]].parameters for r in rows.values())


def test_7b_full_finetune_against_the_textbooks_84_gb():
    r = {r["name"]: r for r in accounting_rows()}["llama-2-7b"]
    # bf16 weights (2) + bf16 gradients (2) + AdamW's two fp32 moments (8) = 12 bytes per parameter
    assert r["full_finetune_state_bytes"] == 12 * 6_738_415_616 == 80_860_987_392
    assert TEXTBOOK_7B_FULL_FINETUNE_BYTES == 84_000_000_000
    # the textbook rounds the model to 7e9 parameters: that is the whole difference
    assert r["full_finetune_state_bytes"] / TEXTBOOK_7B_FULL_FINETUNE_BYTES == pytest.approx(6_738_415_616 / 7e9)
    assert r["full_finetune_peak_bytes"] > r["full_finetune_state_bytes"]  # activations and buffers on top


def test_flops_kv_cache_and_12_n_layer_d2_by_hand():
    s = model_summary("llama-2-7b", seq_len=4096)
    L, d, ctx = 32, 4096, 4096
    assert s["approx_12_n_layer_d2"] == 12 * L * d * d == 6_442_450_944
    # 6 x every matmul weight (non-embedding, LM head included: untied) + 3 x 2 x 2 x L x ctx x d for attention
    matmul = 6_738_415_616 - 32000 * 4096 - (2 * L + 1) * d  # minus the embedding and the norm gains
    assert s["flops_per_token_training_parts"] == {"6N": 6 * matmul, "attention": 12 * L * ctx * d}
    assert s["flops_per_token_training"] == 6 * matmul + 12 * L * ctx * d
    assert s["kv_cache_bytes_per_token"] == {"float32": 2 * L * d * 4, "bfloat16": 2 * L * d * 2}  # K and V
    assert s["inference_memory_bytes"]["bf16"] == 2 * 6_738_415_616 + 2 * L * d * 2 * ctx
    gqa = model_summary("llama-2-70b", seq_len=16)
    assert gqa["kv_cache_bytes_per_token"]["bfloat16"] == 2 * 80 * 8 * 128 * 2  # 8 KV heads of 128


def test_every_preset_has_a_row_and_the_table_renders(capsys):
    assert main(["info", "--table", "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in tables["presets"]}
    assert set(PRESETS) <= set(rows) and set(PUBLISHED) <= set(rows)
    gpt2 = rows["gpt2"]  # 12 x 12 x 768^2 against the exact 85,056,000 (biases and LayerNorm gains make the rest)
    assert (gpt2["approx_12_n_layer_d2"], gpt2["non_embedding_parameters"]) == (84_934_656, 85_056_000)
    text = render_tables(tables["published"], tables["presets"])
    assert "| llama-2-70b | 68,976,648,192 | 68,976,648,192 |" in text
    assert main(["info"]) == 1
    assert "needs a MODEL (or --table)" in capsys.readouterr().err
