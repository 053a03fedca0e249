"""The textbooks' reference models as configs only (no weights), with their published parameter counts,
and the accounting table built from them: `llmkit info --published`.

GPT-2 small (Radford et al. 2019; transformers' `gpt2`), Llama-2-7B and Llama-2-70B (Touvron et al.
2023; the `config.json` of meta-llama/Llama-2-{7b,70b}-hf). The counts are what transformers'
`num_parameters()` gives for those checkpoints: the table is right only if our model has exactly the
same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmkit.analysis.accounting import human, model_summary, training_memory
from llmkit.config import PRESETS, ModelConfig

_LLAMA2 = dict(vocab_size=32000, pos_embedding="rope", norm="rmsnorm", activation="silu", gated_mlp=True,
               bias=False, max_seq_len=4096, norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class Published:
    fields: dict[str, Any] = field(hash=False)
    parameters: int  # the published count
    source: str

    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.fields))


PUBLISHED: dict[str, Published] = {
    "gpt2": Published(dict(PRESETS["gpt2"], name="gpt2"), 124_439_808, "GPT-2 small (openai-community/gpt2)"),
    "llama-2-7b": Published(dict(_LLAMA2, name="llama-2-7b", n_layer=32, n_head=32, d_model=4096, d_ff=11008),
                            6_738_415_616, "Llama-2-7B (meta-llama/Llama-2-7b-hf)"),
    "llama-2-70b": Published(dict(_LLAMA2, name="llama-2-70b", n_layer=80, n_head=64, n_kv_head=8, d_model=8192,
                                  d_ff=28672), 68_976_648_192, "Llama-2-70B (meta-llama/Llama-2-70b-hf)"),
}

# "A 7B model needs 84 GB to fine-tune": 12 bytes per parameter (bf16 weights and gradients, AdamW's
# two fp32 moments) times a nominal 7e9 parameters.
TEXTBOOK_7B_FULL_FINETUNE_BYTES = 12 * 7_000_000_000


def accounting_rows(names: tuple[str, ...] = tuple(PUBLISHED), seq_len: int = 2048) -> list[dict[str, Any]]:
    """One row per model: exact and published counts, 12·n_layer·d², FLOPs per token, memory, KV cache."""
    rows = []
    for name in names:
        pub = PUBLISHED[name]
        config = pub.config()
        s = model_summary(config, seq_len=min(seq_len, config.max_seq_len))
        full = training_memory(config, "full", batch_size=1, seq_len=s["seq_len"], parameters=s["parameters"])
        states = sum(full["bytes"][k] for k in ("weights", "gradients", "optimizer"))
        rows.append({"name": name, "source": pub.source, "parameters": s["parameters"],
                     "published_parameters": pub.parameters, "non_embedding_parameters": s["non_embedding_parameters"],
                     "approx_12_n_layer_d2": s["approx_12_n_layer_d2"], "seq_len": s["seq_len"],
                     "flops_per_token_training": s["flops_per_token_training"],
                     "flops_per_token_training_parts": s["flops_per_token_training_parts"],
                     "weight_memory_bytes": s["weight_memory_bytes"],
                     "kv_cache_bytes_per_token": s["kv_cache_bytes_per_token"],
                     "full_finetune_state_bytes": states, "full_finetune_peak_bytes": full["total_bytes"]})
    return rows


def preset_rows() -> list[dict[str, Any]]:
    """12·n_layer·d² against the exact non-embedding count for every preset (and the published shapes)."""
    rows = []
    configs = {name: ModelConfig.from_preset(name) for name in PRESETS}
    configs.update({name: p.config() for name, p in PUBLISHED.items() if name not in configs})
    for name, config in configs.items():
        s = model_summary(config, seq_len=min(2048, config.max_seq_len))
        rows.append({"name": name, "parameters": s["parameters"], "non_embedding_parameters": s["non_embedding_parameters"],
                     "approx_12_n_layer_d2": s["approx_12_n_layer_d2"], "approx_over_exact": s["approx_over_exact"],
                     "flops_per_token_training": s["flops_per_token_training"], "seq_len": s["seq_len"],
                     "kv_cache_bytes_per_token_bf16": s["kv_cache_bytes_per_token"]["bfloat16"]})
    return rows


def render_tables(published: list[dict[str, Any]], presets: list[dict[str, Any]]) -> str:
    """Both tables as Markdown."""
    lines = ["| model | parameters | published | non-embedding | 12·n_layer·d² | training FLOPs/token (6N + attn) "
             "| bf16 weights | KV cache/token (bf16) | full fine-tune states (bf16 + AdamW) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in published:
        p = r["flops_per_token_training_parts"]
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['published_parameters']:,} | "
                     f"{r['non_embedding_parameters']:,} | {r['approx_12_n_layer_d2']:,} | "
                     f"{human(r['flops_per_token_training'])} ({human(p['6N'])} + {human(p['attention'])}, "
                     f"seq {r['seq_len']}) | {human(r['weight_memory_bytes']['bf16'], 'B')} | "
                     f"{human(r['kv_cache_bytes_per_token']['bfloat16'], 'B')} | "
                     f"{human(r['full_finetune_state_bytes'], 'B')} |")
    lines += ["", f"Textbook 7B full fine-tune: 12 bytes x 7e9 = {human(TEXTBOOK_7B_FULL_FINETUNE_BYTES, 'B')}.", "",
              "| preset | parameters | non-embedding | 12·n_layer·d² | ratio | training FLOPs/token | KV/token (bf16) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in presets:
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['non_embedding_parameters']:,} | "
                     f"{r['approx_12_n_layer_d2']:,} | {r['approx_over_exact']:.3f} | "
                     f"{human(r['flops_per_token_training'])} (seq {r['seq_len']}) | "
                     f"{human(r['kv_cache_bytes_per_token_bf16'], 'B')} |")
    return "\n".join(lines)
