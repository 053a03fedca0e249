"""The table of docs/parallelism.md: per-rank memory and per-step traffic of parallel layouts for Llama-2-7B on
8 GPUs and Llama-2-70B on 64, from llmkit's accounting (`llmkit.analysis.accounting.parallel_costs`).

`python benchmarks/parallel_costs.py` prints the Markdown table. Arithmetic only: no GPU, nothing measured.
bf16 weights and gradients with fp32 AdamW moments, 4,096-token sequences, the same global batch per model
(32 sequences for 7B, 64 for 70B), no activation checkpointing.
"""

from llmkit.analysis.accounting import parallel_costs
from llmkit.analysis.published import PUBLISHED

GB = 1e9
ROWS = [
    ("llama-2-7b", 32, [dict(dp_replicate=8), dict(dp_shard=8), dict(tp=8), dict(pp=8, microbatches=16),
                        dict(tp=2, dp_shard=4), dict(tp=2, pp=2, dp_shard=2, microbatches=4)]),
    ("llama-2-70b", 64, [dict(dp_shard=64), dict(tp=8, dp_shard=8), dict(tp=8, pp=4, dp_shard=2, microbatches=8),
                         dict(tp=8, pp=8, microbatches=16)]),
]


def main() -> None:
    print("| model | GPUs | layout | sequences per rank per micro-batch | weights+grads+AdamW / rank | activations / rank "
          "| sent / rank / step | of which FSDP / replicas / TP / PP |")
    print("|---|---|---|---|---|---|---|---|")
    for name, global_batch, layouts in ROWS:
        config = PUBLISHED[name].config()
        for sizes in layouts:
            sizes = dict(sizes)
            dp = sizes.get("dp_replicate", 1) * sizes.get("dp_shard", 1)
            gpus = dp * sizes.get("tp", 1) * sizes.get("pp", 1)
            m = sizes.setdefault("microbatches", 1)
            micro = global_batch // (dp * m)
            c = parallel_costs(config, micro_batch=micro, seq_len=4096, **sizes)
            assert c["sequences_per_step"] == global_batch
            label = " x ".join(f"{k}={v}" for k, v in sizes.items() if k != "microbatches" and v > 1)
            label += f" ({m} micro-batches)" if sizes.get("pp", 1) > 1 else ""
            t = c["traffic_bytes"]
            print(f"| {name} | {gpus} | {label} | {micro} | {c['state_bytes'] / GB:.1f} GB | "
                  f"{c['activation_bytes'] / GB:.1f} GB | {c['traffic_total_bytes'] / GB:.1f} GB | "
                  f"{t['dp_shard'] / GB:.1f} / {t['dp_replicate'] / GB:.1f} / {t['tp'] / GB:.1f} / {t['pp'] / GB:.1f} |")


if __name__ == "__main__":
    main()
