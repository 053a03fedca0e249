"""What a model costs: parameters, weight memory at each precision, FLOPs per token.

Works from a checkpoint folder or a preset name without allocating the weights (the model is
built on PyTorch's meta device), so `llmkit info gpt2-large` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.config import PRESETS, ModelConfig
from llmkit.errors import ConfigError
from llmkit.moe import inactive_parameters

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


def resolve_config(path_or_preset: str) -> ModelConfig:
    """A checkpoint folder's config, a GGUF file's or registry model's (metadata only), or a named preset."""
    from llmkit.formats import gguf, hf, named

    if Path(path_or_preset).is_dir():
        return hf.read_config(Path(path_or_preset))
    if Path(path_or_preset).is_file() or path_or_preset in named.MODELS:
        return gguf.read_config(named.resolve(path_or_preset))
    if path_or_preset in PRESETS:
        return ModelConfig.from_preset(path_or_preset)
    from llmkit.analysis.published import PUBLISHED

    if path_or_preset in PUBLISHED:
        return PUBLISHED[path_or_preset].config()
    raise ConfigError(f"{path_or_preset!r} is neither a checkpoint folder nor a preset; "
                      f"presets: {sorted(PRESETS)}; published shapes (config only): {sorted(PUBLISHED)}")


def model_summary(path_or_preset: str | ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    from llmkit.model import KVCache, Transformer

    config = path_or_preset if isinstance(path_or_preset, ModelConfig) else resolve_config(path_or_preset)
    with torch.device("meta"):
        model = Transformer(config)
    params = model.num_parameters()
    non_embedding = model.num_parameters(exclude_embeddings=True)
    seq_len = seq_len or config.max_seq_len
    training = model.flops_per_token(seq_len, training=True)
    attention = 3 * 4 * attended_keys(config, seq_len) * config.n_head * config.head_dim
    kv_per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim if config.causal else 0  # an encoder: none
    try:
        family = config.hf_model_type
    except ConfigError:
        family = None
    return {
        "config": config.to_dict(),
        "family": family,
        "parameters": params,
        "non_embedding_parameters": non_embedding,
        # Kaplan et al. (2020): non-embedding N ~ 12 n_layer d^2 (4d^2 attention + 8d^2 for a 4d MLP)
        "approx_12_n_layer_d2": 12 * config.n_layer * config.d_model ** 2,
        "approx_over_exact": 12 * config.n_layer * config.d_model ** 2 / non_embedding,
        "active_parameters": params - inactive_parameters(config),  # run per token (all but idle experts)
        "weight_memory_bytes": {k: int(params * b) for k, b in BYTES_PER_PARAM.items()},
        "seq_len": seq_len,
        "flops_per_token_forward": model.flops_per_token(seq_len, training=False),
        "flops_per_token_training": training,
        # training FLOPs = 6 x the matmul weights (LM head included) + attention's scores and mixing
        "flops_per_token_training_parts": {"6N": training - attention, "attention": attention},
        # 16-bit weights and KV cache (int8/int4: quantized weights, a bf16 cache) for one seq_len sequence
        "inference_memory_bytes": {k: int(params * b + kv_per_token * seq_len * (4 if k == "fp32" else 2))
                                   for k, b in BYTES_PER_PARAM.items()},
        # full fine-tuning with AdamW, one sequence of seq_len (`training_memory`; dense models only)
        "training_memory_bytes": None if config.n_experts else {
            p: training_memory(config, "full", 1, seq_len, p, parameters=params)["total_bytes"] for p in ("bf16", "fp32")},
        # every layer's key and value of one token (a sliding layer stops growing at its window)
        "kv_cache_bytes_per_token": {"float32": kv_per_token * 4, "bfloat16": kv_per_token * 2},
        # one sequence of seq_len tokens; sliding-window layers hold their window only (a ring buffer)
        "kv_cache_bytes": {str(dtype).removeprefix("torch."): KVCache(config, 1, seq_len, "meta", dtype).nbytes
                           if config.causal else 0 for dtype in (torch.float32, torch.bfloat16)},
    }


def attended_keys(c: ModelConfig, seq_len: int) -> int:
    """Keys each query attends to, summed over layers (a sliding layer's window in place of seq_len)."""
    return sum(min(seq_len, c.sliding_window) if c.layer_type(i) == "sliding_attention" else seq_len
               for i in range(c.n_layer))


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    return f"{n:.3g}E{unit}"


def render_summary(s: dict[str, Any]) -> str:
    c, parts = s["config"], s["flops_per_token_training_parts"]
    lines = [f"model: {c['name']} (family: {s.get('family') or 'none of transformers'})",
             "  " + ", ".join(f"{k}={v}" for k, v in c.items() if k != "name"),
             f"parameters: {s['parameters']:,} ({human(s['parameters'])}); "
             f"non-embedding {s['non_embedding_parameters']:,}; 12·n_layer·d² = {s['approx_12_n_layer_d2']:,} "
             f"({s['approx_over_exact']:.3f}x the non-embedding count)"
             + (f"; active per token {s['active_parameters']:,}" if s["active_parameters"] != s["parameters"] else ""),
             "weight memory: " + ", ".join(f"{k} {human(v, 'B')}" for k, v in s["weight_memory_bytes"].items()),
             f"FLOPs per token at seq_len {s['seq_len']}: forward {human(s['flops_per_token_forward'])}, "
             f"training {human(s['flops_per_token_training'])} = 6N {human(parts['6N'])} + attention "
             f"{human(parts['attention'])}",
             f"inference memory (weights + KV cache of one {s['seq_len']}-token sequence): "
             + ", ".join(f"{k} {human(v, 'B')}" for k, v in s["inference_memory_bytes"].items()),
             f"full fine-tuning memory (AdamW, batch 1 x {s['seq_len']}): "
             + (", ".join(f"{k} {human(v, 'B')}" for k, v in s["training_memory_bytes"].items())
                if s["training_memory_bytes"] else "not estimated for mixture-of-experts layers"),
             "KV cache per token: " + ", ".join(f"{k} {human(v, 'B')}" for k, v in s["kv_cache_bytes_per_token"].items()),
             f"KV cache of one {s['seq_len']}-token sequence: "
             + ", ".join(f"{k} {human(v, 'B')}" for k, v in s["kv_cache_bytes"].items())]
    return "\n".join(lines)


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       size: int = 1024, seconds: float = 0.5) -> float:
    """Measured matmul FLOP/s of this device and dtype (the denominator of MFU).

    Cached per device, dtype and thread count in the llmkit cache, since it takes about a second.
    """
    import json
    import time

    from llmkit.files import atomic_write_json, cache_dir

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
    key = f"{name}|{dtype}|{size}"
    cache = cache_dir() / "peak_flops.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return known[key]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    known[key] = 2 * size**3 / best
    atomic_write_json(cache, known)
    return known[key]


# ---- training memory -------------------------------------------------------------------------

# Bytes per parameter of weights, gradients and AdamW's two moments (kept in fp32 as in mixed precision).
_TRAIN_BYTES = {"bf16": {"weights": 2, "grads": 2, "optimizer": 8}, "fp32": {"weights": 4, "grads": 4, "optimizer": 8}}
_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def _linear_shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each block linear."""
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    shapes = {"q": (c.d_model, q), "k": (c.d_model, kv), "v": (c.d_model, kv), "o": (q, c.d_model),
              "up": (c.d_model, c.d_ff), "down": (c.d_ff, c.d_model)}
    if c.gated_mlp:
        shapes["gate"] = (c.d_model, c.d_ff)
    return shapes


def activation_elements_per_token(c: ModelConfig, method: str = "full", lora_targets: tuple[str, ...] = _LINEARS,
                                  lora_r: int = 8) -> int:
    """Elements autograd keeps per token for backward, counted from what torch saves in our blocks
    (tests/test_memory.py checks the count against the saved tensors themselves).

    Per layer: each norm's input and per-token statistics (rstd; LayerNorm also its mean), and in a
    full fine-tune the normalised input its gain's gradient needs; the input of every linear whose
    weight (full) or adapter (LoRA: its A, then A's r outputs for B) has a gradient; attention's q,
    k, v, output and log-sum-exp (SDPA's backward); the MLP's gate, activation and up (both factors
    of their product), or the input of a plain MLP's activation. A frozen base still keeps what the
    gradient needs to flow down to the adapters of lower layers, so LoRA keeps nearly as much as a
    full fine-tune: only what lies below the first layer's lowest adapter is spared. Then the final
    norm, the hidden states' gradient that the fused loss computes in forward
    (`llmkit.losses.linear_cross_entropy`: the logits are never kept), and RoPE's cos and sin.
    Exact for llama, qwen2 and GPT-2 blocks; q/k norms (Gemma-3) are counted to within ~10 % (SDPA
    keeps one more copy of q in some layouts). Dropout masks are not counted (fine-tuning runs
    without dropout).
    """
    full = method == "full"
    adapted = set(_linear_shapes(c)) if full else set(lora_targets) & set(_linear_shapes(c))
    d, q, kv, f = c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff
    norm = d + (1 if c.norm == "rmsnorm" else 2) + (d if full and c.norm == "rmsnorm" else 0)  # LayerNorm rebuilds x-hat
    attention = q + 2 * kv + c.n_head  # SDPA's q, k, v and log-sum-exp (its output: below)
    if c.qk_norm:  # the norms' inputs and statistics (and normalised values); SDPA may copy q once more
        attention += q + c.n_head + kv + c.n_kv_head + (q + kv if full else 0)
    flows = full  # does the gradient have to flow on, to something trainable below this point?
    total = 0
    for _ in range(c.n_layer):  # each op's saved tensors, in forward order
        total += norm if flows else 0
        if adapted & {"q", "k", "v"}:
            total, flows = total + d, True
        total += (attention if flows else 0) + (q if flows or "o" in adapted else 0)  # + SDPA's output
        flows = flows or "o" in adapted
        total += (2 if c.sandwich_norm else 1) * norm if flows else 0
        if adapted & {"gate", "up"}:
            total, flows = total + d, True
        total += (3 * f if c.gated_mlp else f) if flows else 0
        if "down" in adapted:
            total, flows = total + f, True
        total += norm if flows and c.sandwich_norm else 0
        total += 0 if full else lora_r * len(adapted)
    rope = 2 * c.head_dim * len(set(map(c.layer_type, range(c.n_layer)))) if c.pos_embedding == "rope" else 0
    return total + norm + d + rope


def transient_elements_per_token(c: ModelConfig) -> int:
    """Short-lived buffers at the peak, per token: backward through one MLP holds the gradients of its
    gate, up and activation (3 d_ff) besides the gradients of the residual stream and its norm, and
    the fused loss's hidden-state gradient is rescaled into a new tensor (3 d_model)."""
    return (3 if c.gated_mlp else 2) * c.d_ff + 3 * c.d_model


# The fused loss's logits chunk (llmkit.losses._chunk_rows: 2**21 fp32 scores on a CPU).
_LOSS_CHUNK_BYTES = 4 << 21


def training_memory(config: ModelConfig, method: str = "full", batch_size: int = 1, seq_len: int = 512,
                    precision: str = "bf16", lora_r: int = 8, lora_targets: tuple[str, ...] = _LINEARS,
                    base_bits: int = 4, group_size: int = 64, runtime_bytes: int = 0,
                    parameters: int | None = None) -> dict[str, Any]:
    """Estimated peak training memory in bytes (`total_bytes`) and its parts: weights, gradients,
    optimizer states, activations, transient buffers and the runtime.

    full: every weight has a gradient and AdamW's two fp32 moments (bf16: 2 + 2 + 8 = 12 bytes per
    parameter, so a 7B model needs ~84 GB before activations). lora: the base is frozen (weights
    only); the adapters r·(in + out) per targeted linear carry fp32 weights, gradients and moments.
    qlora: as lora, with the block linears stored in `base_bits` (+ an fp16 scale and zero per
    group of `group_size` for 4 bits, an fp32 scale per row for 8); each is dequantized to a float
    weight (and a temporary of the same size) for its matmul, one layer at a time. Activations: see
    `activation_elements_per_token`, at the activation precision, times batch_size·seq_len;
    transient buffers: `transient_elements_per_token` and the fused loss's logits chunk.

    The peak comes at the start of backward: weights, optimizer states (from the second step on),
    every activation, and in a full fine-tune the LM head's gradient twice (the fused loss makes it
    in forward and rescales it into a new tensor in backward). Backward frees each layer's activations as it makes its gradients, so gradients and
    activations are never all held at once: the peak counts the larger of the two. `runtime_bytes`
    (python, torch and whatever else the process holds before the model; measure it, e.g. with
    `llmkit.train.memory.rss_mb`) is added as given.

    What the tensors need is what the process holds only if the allocator returns freed memory:
    glibc's malloc by default keeps it for reuse, and then resident memory runs 1.5-2.3x the
    activations higher over the first steps (benchmarks/finetune_memory.py measures both;
    MALLOC_MMAP_THRESHOLD_=131072 gives this estimate, at some speed on small models).
    """
    if method not in ("full", "lora", "qlora"):
        raise ConfigError(f"method={method!r}; expected full, lora or qlora")
    if config.n_experts:
        raise ConfigError(f"the training-memory estimate does not model mixture-of-experts layers (n_experts="
                          f"{config.n_experts}: routed activations, idle experts' gradients); expected a dense model")
    if precision not in _TRAIN_BYTES:
        raise ConfigError(f"precision={precision!r}; expected one of {sorted(_TRAIN_BYTES)}")
    b = _TRAIN_BYTES[precision]
    params = parameters
    if params is None:  # (the caller may know it: building even a meta model takes a while at 70B)
        with torch.device("meta"):
            from llmkit.model import Transformer

            params = Transformer(config).num_parameters()
    shapes = _linear_shapes(config)
    unknown = [t for t in lora_targets if t not in shapes]
    if method != "full" and unknown:
        raise ConfigError(f"LoRA target(s) {unknown} are not linears of this model; it has {sorted(shapes)}")
    block_linear = config.n_layer * sum(i * o for i, o in shapes.values())
    dequantized = 0
    if method == "full":
        trainable, weights = params, params * b["weights"]
    else:
        trainable = config.n_layer * sum(lora_r * (shapes[t][0] + shapes[t][1]) for t in lora_targets)
        if method == "lora":
            weights = params * b["weights"] + trainable * 4
        else:
            per_weight = base_bits / 8 + (4 / group_size if base_bits == 4 else 0)
            rows = config.n_layer * sum(o for _, o in shapes.values())
            quantized = block_linear * per_weight + (rows * 4 if base_bits == 8 else 0)
            weights = (params - block_linear) * b["weights"] + quantized + trainable * 4
            dequantized = 2 * max(i * o for i, o in shapes.values()) * b["weights"]
    grads = trainable * (b["grads"] if method == "full" else 4)
    optimizer = trainable * b["optimizer"]
    act_bytes = 2 if precision == "bf16" else 4
    tokens = batch_size * seq_len
    activations = activation_elements_per_token(config, method, lora_targets, lora_r) * tokens * act_bytes
    transient = transient_elements_per_token(config) * tokens * act_bytes + _LOSS_CHUNK_BYTES + dequantized
    # the LM head's gradient: made in forward by the fused loss, rescaled into a new tensor in backward
    head_grad = 2 * config.vocab_size * config.d_model * b["grads"] if method == "full" else 0
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
             "transient": transient, "runtime": runtime_bytes}
    parts = {k: int(v) for k, v in parts.items()}
    peak = (runtime_bytes + weights + optimizer + max(activations + head_grad, grads) + transient)
    return {"method": method, "precision": precision, "parameters": params, "trainable_parameters": trainable,
            "batch_size": batch_size, "seq_len": seq_len, "bytes": parts, "total_bytes": int(peak)}


def render_training_memory(m: dict[str, Any]) -> str:
    parts = ", ".join(f"{k} {human(v, 'B')}" for k, v in m["bytes"].items())
    return (f"{m['method']} fine-tuning ({m['precision']}, batch {m['batch_size']} x {m['seq_len']} tokens): "
            f"peak {human(m['total_bytes'], 'B')} of {parts} (gradients and activations are not all held at "
            f"once); trainable {m['trainable_parameters']:,} of {m['parameters']:,} parameters")


def parallel_costs(config: ModelConfig, *, dp_replicate: int = 1, dp_shard: int = 1, tp: int = 1, pp: int = 1,
                   ep: int = 1, microbatches: int = 1, micro_batch: int = 1, seq_len: int = 4096,
                   precision: str = "bf16") -> dict[str, Any]:
    """Per-rank memory and per-step traffic of one parallel layout, placed as `llmkit.train.parallel` places
    it: tp splits each block's linears, the embedding and the LM head (norms and a MoE stay whole), ep
    a MoE block's experts, pp gives each stage
    ceil(n_layer / pp) blocks (the first the embedding, the last the final norm and head), FSDP shards what a
    rank holds over dp_shard, replicas copy it over dp_replicate.

    Memory (bytes, the fullest stage): weights + gradients + AdamW moments at `precision` (`_TRAIN_BYTES`),
    and activations of `activation_elements_per_token` for the stage's blocks, divided by tp (with sequence
    parallel norms), times the micro-batches a 1F1B first stage holds (min(pp, microbatches)).
    Traffic (bytes each rank sends per optimizer step, ring collectives: an all-reduce of S bytes over n
    ranks sends 2 (n-1)/n S, an all-gather or reduce-scatter (n-1)/n S): FSDP gathers the weights for
    forward and again for backward and reduce-scatters the gradients; replicas all-reduce their gradient
    shards; tp all-reduces (or, with sp, all-gathers then reduce-scatters: the same volume) the residual
    stream twice per block in forward and twice in backward, once after the embedding and once for the loss's
    gradient of the hidden states (a pipeline's last stage all-gathers the logits instead, and reduce-scatters
    their gradient); pp sends each micro-batch's activations
    forward and their gradients back; ep all-reduces each MoE block's output in forward and its input's
    gradient in backward.
    """
    if precision not in _TRAIN_BYTES:
        raise ConfigError(f"precision={precision!r}; expected one of {sorted(_TRAIN_BYTES)}")
    b = _TRAIN_BYTES[precision]
    act = 2 if precision == "bf16" else 4
    from llmkit.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    split = sum(p.numel() for n, p in model.blocks[0].named_parameters()  # what tp splits: the linears
                if (n.startswith("attn.") and "_norm" not in n) or (n.startswith("mlp.") and not config.n_experts))
    experts = sum(p.numel() for n, p in model.blocks[0].named_parameters()  # what ep splits
                  if config.n_experts and n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    embed = model.embed.weight.numel()
    head = 0 if config.tie_embeddings else model.lm_head.weight.numel()
    layers = -(-config.n_layer // pp)
    embed, head = embed // tp, head // tp  # tp splits the embedding and the LM head by vocabulary rows
    ends = [embed + (head + config.d_model if pp == 1 else 0), head + config.d_model]  # first, last stage
    stage_params = layers * (split // tp + experts // ep + block - split - experts) + max(ends)
    params = stage_params / dp_shard
    tokens = micro_batch * seq_len
    in_flight = min(pp, microbatches)
    activations = activation_elements_per_token(config) * layers / config.n_layer * tokens * in_flight / tp * act
    states = params * (b["weights"] + b["grads"] + b["optimizer"])

    def ring(n: int, all_reduce: bool = False) -> float:
        return (2 if all_reduce else 1) * (n - 1) / n

    residual = tokens * config.d_model * act  # one micro-batch's residual stream
    traffic = {
        "dp_shard": ring(dp_shard) * stage_params * (2 * b["weights"] + b["grads"]),
        "dp_replicate": ring(dp_replicate, True) * params * b["grads"],
        # per block two all-reduces forward and two backward; without pp, the embedding's forward and the loss's
        # hidden-state gradient; a pipeline's last stage (the fullest) gathers the logits and reduce-scatters
        # their gradient instead
        "tp": ((4 * layers + (2 if pp == 1 else 0)) * ring(tp, True) * residual
               + (2 * ring(tp) * tokens * config.vocab_size * act if pp > 1 else 0)) * microbatches,
        "pp": (2 * residual * microbatches) if pp > 1 else 0,
        "ep": 2 * ring(ep, True) * residual * layers * microbatches,  # experts' outputs; the input's gradient
    }
    return {"parameters_per_rank": int(params), "state_bytes": int(states), "activation_bytes": int(activations),
            "memory_bytes": int(states + activations), "traffic_bytes": {k: int(v) for k, v in traffic.items()},
            "traffic_total_bytes": int(sum(traffic.values())),
            "sequences_per_step": dp_replicate * dp_shard * microbatches * micro_batch}
