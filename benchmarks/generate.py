"""Generation speed, llama-bench style: llmkit vs transformers on the same weights, side by side.

Measured in one process, the systems interleaved repetition by repetition (so a busy machine slows
them alike), with `--threads` threads:
- pp512: prefill tok/s of a 512-token prompt (the forward pass that yields the first token's
  logits; transformers with `logits_to_keep=1`, as its `generate` does);
- tg128: decode tok/s at batch 1: (128 - 1) / (time of generate(128 tokens) - time of generate(1));
- tg128 x8: decode throughput at batch 8, the same way, 8 * 127 tokens.
Greedy, EOS ignored. Systems: transformers fp32, llmkit fp32, llmkit with weight-only int8 and
int4 linear layers (`llmkit.quant`; the LM head int8 in both), llmkit decoding with its
compiled step (`compile=True`, the default here; `--no-compile` for eager; compilation happens in
the warm-up, on the shapes that are then timed), and, when `--model` is a GGUF file or registry name,
llama.cpp on that very file as the anchor (llama-cpp-python; batch-1 figures only, since it decodes
one sequence at a time). The accuracy cost of each llmkit variant against
transformers fp32 is measured on the same run: logits of a teacher-forced sequence (max abs error,
mean KL, top-1 agreement) and the greedy 64-token continuation (tokens equal before divergence).

By default the model is SmolLM2-135M-Instruct from the registry (its Q4_1 GGUF, read by
`llmkit.load` and written to a temporary HF folder so both systems load the same dequantized
tensors; llama.cpp runs the GGUF itself). `--model` takes another registry name, a .gguf file or an
HF llama folder, `--model random` the `--preset` architecture with random weights.

The accuracy cost is measured twice: on the model's own weights (real text), and on the same
architecture with random fp32 weights (`off_grid`). The second matters because a Q4_1 GGUF's weights
already sit on int4's grid (groups of 32 with a scale and a minimum), so int4 at group 32 re-quantizes
them losslessly; weights that were never 4-bit show what int4 and int8 really cost.

    python benchmarks/generate.py                                  # -> benchmarks/results/generate.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from provenance import cpu_name, provenance

from llmkit import ModelConfig, Transformer
from llmkit.generate.engine import generate_tensor
from llmkit.quant import quantize

ACCURACY_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "far faster than any scribe. Within fifty years presses were running in more than two hundred cities "
    "across Europe, and the price of books fell so sharply that reading spread beyond monasteries and "
    "universities to merchants, artisans and eventually ordinary households. Historians still debate how "
    "much the press caused the Reformation, the scientific revolution and the rise of national languages, "
    "but few doubt that it changed how knowledge was stored, copied and argued about. Newspapers, "
    "pamphlets and encyclopedias all grew from the same simple idea: set the letters once, print many times."
)


def make_random_checkpoint(folder: Path, preset: str, seed: int) -> Path:
    torch.manual_seed(seed)
    Transformer(ModelConfig.from_preset(preset)).save_pretrained(folder)
    return folder


def load_systems(folder: Path, variants: list[str]):
    """{name: (kind, model)}: transformers fp32 and the llmkit variants, all from `folder`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = Transformer.from_pretrained(folder)
    systems = {"transformers-fp32": ("hf", hf)}
    for v in variants:
        if v == "fp32":
            systems["llmkit-fp32"] = ("llmkit", ours)
        else:
            systems[f"llmkit-{v}"] = ("llmkit", quantize(copy.deepcopy(ours), bits=int(v[3:])))
    return systems


# ---- one measurement each ----------------------------------------------------------------------


@torch.inference_mode()
def prefill_seconds(kind, model, ids) -> float:
    start = time.perf_counter()
    if kind == "hf":
        model(ids, logits_to_keep=1, use_cache=True)
    elif kind == "llamacpp":  # one sequence: evaluate the prompt from an empty cache
        model.llm.reset()
        model.llm.eval(ids[0].tolist())
    else:
        from llmkit import KVCache

        cache = KVCache(model.config, ids.shape[0], ids.shape[1] + 1, dtype=model.dtype)
        model.lm_head(model.hidden_states(ids, kv_cache=cache)[:, -1])
    return time.perf_counter() - start


@torch.inference_mode()
def generate_seconds(kind, model, ids, new_tokens: int, compile: bool = False) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    if kind == "llamacpp":
        new = model.generate(ids[0].tolist(), new_tokens)
        elapsed = time.perf_counter() - start
        assert len(new) == new_tokens, "generation stopped early"
        return elapsed, torch.cat([ids[0], torch.tensor(new)])[None]
    if kind == "hf":
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    else:
        out = generate_tensor(model, ids, max_new_tokens=new_tokens, temperature=0, ignore_eos=True, compile=compile)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens, "generation stopped early"
    return elapsed, out


def decode_tok_s(kind, model, ids, new_tokens: int, compile: bool = False) -> float:
    t_all, _ = generate_seconds(kind, model, ids, new_tokens, compile)
    t_one, _ = generate_seconds(kind, model, ids, 1, compile)
    return ids.shape[0] * (new_tokens - 1) / max(t_all - t_one, 1e-9)


# ---- accuracy ------------------------------------------------------------------------------------


@torch.inference_mode()
def accuracy(reference, model, kind, seq: torch.Tensor, prompt: torch.Tensor) -> dict:
    """The cost of a variant against the reference (transformers fp32) on the same weights."""
    ref = reference(seq).logits.float()
    got = (model(seq).logits if kind == "hf" else model(seq)).float()
    ref_lp, got_lp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1).mean()
    ref_greedy = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                                    min_new_tokens=64, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    _, out = generate_seconds(kind, model, prompt, 64)
    same = (ref_greedy == out[0, prompt.shape[1]:]).long()
    result = {}
    if kind == "llmkit":  # the same sequence one token at a time: the decode path alone (small batches)
        from llmkit import KVCache
        from llmkit.generate.engine import DecodeStep

        cache = KVCache(model.config, 1, seq.shape[1], dtype=model.dtype)
        step = DecodeStep(model)
        rows = [model(seq[:, :1], kv_cache=cache)[:, -1]] + [step(seq[:, t], cache) for t in range(1, seq.shape[1])]
        dec_lp = torch.log_softmax(torch.cat(rows).float()[None], -1)
        result = {"decode_path_mean_kl_nats": float((ref_lp.exp() * (ref_lp - dec_lp)).sum(-1).mean()),
                  "decode_path_top1_agreement": float((ref.argmax(-1) == dec_lp.argmax(-1)).float().mean())}
    return {**result, "max_abs_logit_error": float((ref - got).abs().max()),
            "logit_std": float(ref.std()),
            "mean_kl_nats": float(kl),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "greedy64_tokens_equal_before_divergence": int(same.cumprod(0).sum())}


def gguf_path(model: str | None) -> Path | None:
    """The GGUF file behind `--model` (a .gguf path or a registry name), for the llama.cpp anchor."""
    if model is None or Path(model).is_dir():
        return None
    if model.endswith(".gguf"):
        return Path(model)
    from llmkit.formats.named import resolve

    found = resolve(model)
    return Path(found) if str(found).endswith(".gguf") else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a registry name, .gguf file or HF llama folder; 'random': --preset with random weights")
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the best and median are kept")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", default="fp32,int8,int4", help="llmkit variants: fp32, int8, int4")
    p.add_argument("--accuracy-only", action="store_true", help="skip the timings")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="llmkit decodes with its compiled step (the first call per shape compiles, in the warm-up)")
    p.add_argument("--llamacpp", type=lambda v: v.lower() != "false", default=True,
                   help="with a GGUF --model, also time llama.cpp on that file (the anchor); 'false' to skip")
    p.add_argument("--out", default="benchmarks/results/generate.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    load_before = os.getloadavg()

    started = provenance("benchmarks/generate.py")
    if args.model == "random":
        args.model = None
    tokenizer = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            folder = make_random_checkpoint(Path(tmp), args.preset, seed=0)
        elif Path(args.model).is_dir():
            folder = Path(args.model)
        else:  # a .gguf file or a registry name
            import llmkit

            model, tokenizer = llmkit.load(args.model)
            folder = model.save_pretrained(Path(tmp))
        systems = load_systems(folder, args.variants.split(","))
    gguf = gguf_path(args.model)
    if gguf is not None and args.llamacpp:
        from llmkit.formats.llamacpp import LlamaCpp

        # The anchor: llama.cpp on the GGUF itself (its quantized weights, its own kernels).
        systems[f"llama.cpp-{gguf.stem.split('.')[-1]}"] = (
            "llamacpp", LlamaCpp(gguf, n_ctx=args.prompt + args.new + 16, n_threads=args.threads, logits_all=False))
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(systems.values()))[1].config.vocab_size
    long_prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    short = torch.randint(0, vocab, (1, 8), generator=g)
    batch = torch.randint(0, vocab, (args.batch, 8), generator=g)
    seq = torch.randint(0, vocab, (1, 256), generator=g)
    if tokenizer is not None:  # real weights: measure the accuracy cost on real text
        seq = torch.tensor([tokenizer.encode(ACCURACY_TEXT)[:256]])
        short = torch.tensor([tokenizer.encode("The cat sat on the mat. Then it")])
    if args.accuracy_only:
        args.reps = 0

    for kind, model in systems.values() if args.reps else []:  # warm-up: first calls allocate and pick kernels
        prefill_seconds(kind, model, long_prompt[:, :64])  # and compile, on the very shapes timed below
        generate_seconds(kind, model, short, 4 if kind == "hf" else args.new, args.compile)
        if kind == "llmkit":
            generate_seconds(kind, model, batch, args.new, args.compile)

    runs = {name: {"pp": [], "tg": [], "tg_batch": []} for name in systems}
    for rep in range(args.reps):
        for name, (kind, model) in systems.items():
            runs[name]["pp"].append(args.prompt / prefill_seconds(kind, model, long_prompt))
            runs[name]["tg"].append(decode_tok_s(kind, model, short, args.new, args.compile))
            if kind != "llamacpp":  # llama-cpp-python decodes one sequence at a time
                runs[name]["tg_batch"].append(decode_tok_s(kind, model, batch, args.new, args.compile))
            print(f"rep {rep} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs[name].items() if v), flush=True)

    labels = {"pp": f"prefill_tok_s_pp{args.prompt}", "tg": f"decode_tok_s_tg{args.new}_batch1",
              "tg_batch": f"decode_tok_s_tg{args.new}_batch{args.batch}"}
    results, ratios, ratios_llamacpp = {}, {}, {}
    if args.reps:
        for name, r in runs.items():
            results[name] = {labels[k]: {"best": round(max(v), 2), "median": round(statistics.median(v), 2),
                                         "all": [round(x, 2) for x in v]} for k, v in r.items() if v}
        base = results["transformers-fp32"]
        ratios = {name: {labels[k]: {s: round(results[name][labels[k]][s] / base[labels[k]][s], 2)
                                     for s in ("best", "median")} for k in runs[name] if runs[name][k]}
                  for name in results if name != "transformers-fp32"}
        anchor = next((n for n, (kind, _) in systems.items() if kind == "llamacpp"), None)
        if anchor is not None:
            ratios_llamacpp = {name: {key: {s: round(results[name][key][s] / results[anchor][key][s], 2)
                                            for s in ("best", "median")}
                                      for key in results[anchor] if key in results[name]}
                               for name in results if name.startswith("llmkit")}

    reference = systems["transformers-fp32"][1]
    cost = {name: accuracy(reference, model, kind, seq, short) for name, (kind, model) in systems.items()
            if name != "transformers-fp32" and kind != "llamacpp"}
    off_grid = {}
    if args.model is not None:  # the same architecture with weights that were never 4-bit
        del systems
        with tempfile.TemporaryDirectory() as tmp:
            folder = make_random_checkpoint(Path(tmp), args.preset, seed=0)
            randoms = load_systems(folder, args.variants.split(","))
        rseq = torch.randint(0, randoms["transformers-fp32"][1].config.vocab_size, (1, 256), generator=g)
        off_grid = {name: accuracy(randoms["transformers-fp32"][1], model, kind, rseq, rseq[:, :8])
                    for name, (kind, model) in randoms.items() if name != "transformers-fp32"}

    import transformers

    report = {
        **started, "benchmark": "generate", "model": str(args.model or f"{args.preset} preset, random weights (seed 0)"),
        "threads": args.threads, "reps": args.reps, "greedy": True, "ignore_eos": True, "llmkit_compiled": args.compile,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "results": results, "ratio_vs_transformers": ratios, "ratio_vs_llamacpp": ratios_llamacpp, "accuracy_vs_transformers_fp32": cost,
        "accuracy_off_grid": {"weights": f"{args.preset} preset, random fp32 weights (seed 0), random tokens",
                              **off_grid} if off_grid else {},
        "notes": ("int8/int4: weight-only, PyTorch's packed CPU kernels with bf16 activations for <= 16 rows "
                  "(decoding); for prefill, int8 weights (int4 re-quantized per channel) times int8 activations "
                  "(per row) through torch._int_mm. mean_kl_nats/top1 are teacher-forced in one pass (the "
                  "prefill path); decode_path_* feed the same tokens one at a time (the decode path); q/k/v and gate/up fused into one "
                  "layer each; the LM head int8 in both (int4 blocks); norms, attention, KV cache and "
                  "logits stay fp32. Accuracy is measured with eager decoding. Random weights give flat distributions, so top-1 agreement and greedy "
                  "divergence are pessimistic; KL is the fairer accuracy figure."),
    }
    text = json.dumps(report, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(text + "\n")
    os.replace(tmp_out, out)


if __name__ == "__main__":
    main()
