"""SmolLM2-135M-Instruct from GGUF: llmkit against llama.cpp (and transformers), and our GGUF exports.

Measures, on the packaged Q4_1 file: tokenizer agreement with llama.cpp on real documents; the
largest logit difference from transformers loading the same file; top-1 agreement, KL and
perplexity against llama.cpp on ~2,000 KJV tokens; where greedy chat replies diverge and the
logit margin there. Then re-exports the model at each file type and tabulates size, bits per
weight, compression and perplexity (llama.cpp and llmkit reading the same file). Prints JSON and
writes benchmarks/results/gguf.json; docs/gguf.md quotes it.

    .venv/bin/python benchmarks/gguf_llamacpp.py [--tokens 2000] [--skip-transformers] [--types Q8_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from provenance import provenance  # noqa: E402

import llmkit  # noqa: E402
from llmkit.data.corpora import documents  # noqa: E402
from llmkit.formats.gguf import read_gguf, write_gguf  # noqa: E402
from llmkit.formats.llamacpp import LlamaCpp, agreement, margin, perplexity  # noqa: E402
from llmkit.formats.named import resolve  # noqa: E402

NAME = "smollm2-135m-instruct"
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M"]
CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "List three uses of a paperclip."]


def kjv_ids(tok, n: int) -> list[int]:
    text = ""
    for doc in documents("kjv"):
        text += doc.text + "\n\n"
        if len(text) > 6 * n:
            break
    return tok.encode(text)[:n]


def logits_of(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def tokenizer_agreement(tok, ref, n_docs: int = 100) -> dict:
    docs, same, tokens = 0, 0, 0
    for source in ("kjv", "shakespeare", "wikipedia"):
        for i, doc in enumerate(documents(source)):
            if i >= n_docs:
                break
            text = doc.text[:4000]
            ours = tok.encode(text)
            docs += 1
            same += ours == ref.tokenize(text)
            tokens += len(ours)
    return {"documents": docs, "identical": same, "tokens": tokens}


def greedy_divergence(model, tok, ref, prompt: str, n: int = 64) -> dict:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
    theirs = ref.greedy(ids, n, stop_ids=(tok.eos_id,))
    ours = llmkit.generate(model, tok, list(ids), max_new_tokens=n, temperature=0.0).token_ids
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    out = {"prompt": prompt, "ours": tok.decode(ours), "llama.cpp": tok.decode(theirs), "diverge_at": k}
    if k is not None:
        prefix = list(ids) + ours[:k]
        out.update(our_margin=margin(logits_of(model, prefix)[-1]), llama_margin=margin(ref.logits(prefix)[-1]),
                   our_token=tok.decode([ours[k]]), llama_token=tok.decode([theirs[k]]))
    return out


def quant_table(src, ids, types, folder: Path) -> list[dict]:
    n_params = sum(t.numel() for k, t in src.tensors.items() if k != "lm_head.weight" or not src.config.tie_embeddings)
    rows = []
    for quant in types:
        path = folder / f"smollm2-{quant}.gguf"
        t = time.perf_counter()
        written = write_gguf(path, src.config, src.tensors, src.tokenizer, quant=quant)
        seconds = time.perf_counter() - t
        ref = LlamaCpp(path, n_ctx=max(2048, len(ids)))
        ppl_llama = perplexity(ref.logits(ids), ids)
        ref.close()
        contents = read_gguf(path)
        model = llmkit.Transformer.from_state_dict(contents.config, contents.tensors)
        ppl_ours = perplexity(logits_of(model, ids), ids)
        size = path.stat().st_size
        mix: dict[str, int] = {}
        for name in written.values():
            mix[name] = mix.get(name, 0) + 1
        rows.append({"type": quant, "bytes": size, "bits_per_weight": size * 8 / n_params,
                     "ppl_llama_cpp": ppl_llama, "ppl_llmkit": ppl_ours, "export_seconds": seconds, "tensor_types": mix})
        path.unlink()
        print(json.dumps(rows[-1]), flush=True)
    f32 = next((r["bytes"] for r in rows if r["type"] == "F32"), None)
    for r in rows:
        r["compression_vs_f32"] = f32 / r["bytes"] if f32 else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()

    path = resolve(NAME)
    model, tok = llmkit.load(NAME)
    ref = LlamaCpp(path, n_ctx=max(2048, args.tokens))
    ids = kjv_ids(tok, args.tokens)
    ours, theirs = logits_of(model, ids), ref.logits(ids)
    result = {
        "model": f"{NAME} ({path.name})",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "tokenizer_vs_llama_cpp": tokenizer_agreement(tok, ref),
        "vs_llama_cpp": {**agreement(ours, theirs), "ppl_llmkit": perplexity(ours, ids),
                         "ppl_llama_cpp": perplexity(theirs, ids), "text": f"KJV, first {len(ids)} tokens"},
        "greedy_chats": [greedy_divergence(model, tok, ref, p) for p in CHATS],
        **provenance("benchmarks/gguf_llamacpp.py"),  # its machine (the CPU model) replaces the one above
    }
    ref.close()
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        short = ids[:256]
        with torch.no_grad():
            diff = (hf(torch.tensor([short])).logits[0] - model(torch.tensor([short]))[0]).abs().max()
        result["vs_transformers_max_abs_diff"] = float(diff)
        del hf
    print(json.dumps(result, indent=2), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["quantization"] = quant_table(read_gguf(path), ids, args.types.split(","), Path(tmp))
    out = Path(__file__).parent / "results" / "gguf.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
