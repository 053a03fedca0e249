"""The table of docs/parallelism.md: per-rank memory and per-step traffic of parallel layouts for Llama-2-7B on
8 GPUs and Llama-2-70B on 64, from llmkit's accounting (`llmkit.analysis.accounting.parallel_costs`).

`python benchmarks/parallel_costs.py` prints the Markdown table and writes it, with llama-tiny's fp32 parameter
bytes per rank under the layouts tests/test_parallel.py runs (which asserts the measured bytes equal these), to
benchmarks/results/parallel_costs.json with the command, commit and machine. Arithmetic only: no GPU.
bf16 weights and gradients with fp32 AdamW moments, 4,096-token sequences, the same global batch per model
(32 sequences for 7B, 64 for 70B), no activation checkpointing.
"""

import json
from pathlib import Path

from provenance import provenance

from llmkit.analysis.accounting import parallel_costs
from llmkit.analysis.published import PUBLISHED
from llmkit.config import ModelConfig

GB = 1e9
ROWS = [
    ("llama-2-7b", 32, [dict(dp_replicate=8), dict(dp_shard=8), dict(tp=8), dict(pp=8, microbatches=16),
                        dict(tp=2, dp_shard=4), dict(tp=2, pp=2, dp_shard=2, microbatches=4)]),
    ("llama-2-70b", 64, [dict(dp_shard=64), dict(tp=8, dp_shard=8), dict(tp=8, pp=4, dp_shard=2, microbatches=8),
                         dict(tp=8, pp=8, microbatches=16)]),
]


TINY = [dict(), dict(tp=2), dict(pp=2), dict(tp=2, dp_shard=2), dict(tp=2, pp=2)]  # tests/test_parallel.py's


def main() -> None:
    rows = []
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
            rows.append({"model": name, "gpus": gpus, "layout": label, "sequences_per_rank_per_microbatch": micro,
                         "state_gb": round(c["state_bytes"] / GB, 1), "activation_gb": round(c["activation_bytes"] / GB, 1),
                         "sent_gb": round(c["traffic_total_bytes"] / GB, 1),
                         "sent_gb_by_dimension": {k: round(v / GB, 1) for k, v in t.items()}})
            print(f"| {name} | {gpus} | {label} | {micro} | {c['state_bytes'] / GB:.1f} GB | "
                  f"{c['activation_bytes'] / GB:.1f} GB | {c['traffic_total_bytes'] / GB:.1f} GB | "
                  f"{t['dp_shard'] / GB:.1f} / {t['dp_replicate'] / GB:.1f} / {t['tp'] / GB:.1f} / {t['pp'] / GB:.1f} |")

    tiny = ModelConfig.from_preset("llama-tiny")
    per_rank = {" x ".join(f"{k}={v}" for k, v in sizes.items()) or "one process":
                4 * parallel_costs(tiny, **sizes)["parameters_per_rank"] for sizes in TINY}  # fp32: 4 bytes each
    mixtral = ModelConfig.from_preset("mixtral-2m")
    per_rank["mixtral-2m, one process"] = 4 * parallel_costs(mixtral)["parameters_per_rank"]
    per_rank["mixtral-2m, ep=2"] = 4 * parallel_costs(mixtral, ep=2)["parameters_per_rank"]
    out = Path(__file__).parent / "results" / "parallel_costs.json"
    out.write_text(json.dumps({**provenance("benchmarks/parallel_costs.py"), "seq_len": 4096, "rows": rows,
                               "llama_tiny_fp32_parameter_bytes_per_rank": per_rank}, indent=2) + "\n")
    print(per_rank)


if __name__ == "__main__":
    main()
