"""Every file reader, fed random truncations and byte flips of a small real file (hypothesis,
derandomized so CI sees the same cases): the result is an llmkit error naming the file, or a load
that is right. Never a raw exception, a hang, or a silent load of wrong data.

What "right" can mean depends on the format, and each test says it:
- a byte flip inside tensor data loads (the data are just numbers; safetensors and GGUF carry no
  checksum; a training checkpoint's are checked by tests/test_train_faults.py). A flip in the
  structure (a header, an offset, a length, a dtype) must fail or leave every tensor bit-identical;
- a value in a JSON or YAML file (a token's text, lora_alpha, a description) is data too: a flip may
  change it. A flip in the syntax or a key must fail (misspelt keys are refused, not ignored);
- JSONL and YAML have no end marker: a cut at a line boundary is a shorter valid file, so a cut must
  fail or load exactly the rows (the keys) before it.
"""

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit import ModelConfig, Transformer
from llmkit.data.chat import load_examples
from llmkit.data.labelled import read_labelled
from llmkit.data.preferences import read_preference_pairs
from llmkit.data.prepare import read_documents
from llmkit.errors import LlmkitError
from llmkit.eval.tasks import task_from_file
from llmkit.formats import gguf, hf
from llmkit.peft.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from llmkit.peft.prompt_tuning import PromptTuning, load_prompt, save_prompt
from llmkit.tokenizer import Tokenizer

ROOT = Path(__file__).parents[1]
# A hang would show as one example running 10 s: thousands of times a normal one (milliseconds).
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=10), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


# ---- damage -----------------------------------------------------------------------------------


def damage(size: int, structure_end: int, fields: list[tuple[int, int]] = ()):
    """A cut at a random length, or 1-3 bytes XORed with random non-zero values; most flips land in the
    first `structure_end` bytes (the header of a binary format), where damage must be caught, or in one
    of its `fields` ([start, end) byte ranges worth aiming at: offsets, types), the others anywhere."""
    aimed = [st.sampled_from(fields).flatmap(lambda f: st.integers(f[0], f[1] - 1))] if fields else []
    position = st.one_of(st.integers(0, structure_end - 1), *aimed, st.integers(0, size - 1))
    flips = st.lists(st.tuples(position, st.integers(1, 255)), min_size=1, max_size=3, unique_by=lambda f: f[0])
    return st.one_of(st.tuples(st.just("cut"), st.integers(0, size - 1)), st.tuples(st.just("flip"), flips))


def damaged(original: bytes, what) -> bytes:
    kind, how = what
    if kind == "cut":
        return original[:how]
    data = bytearray(original)
    for position, xor in how:
        data[position] ^= xor
    return bytes(data)


def touches_data(what, start: int) -> bool:
    """True when a flip lands at or after byte `start` (inside the data section, whose values may change)."""
    return what[0] == "flip" and any(position >= start for position, _ in what[1])


def read_damaged(file: Path, original: bytes, what, read):
    """`read()` with `file` damaged: its result, or None when it raised an llmkit error naming the file."""
    file.write_bytes(damaged(original, what))
    try:
        return read()
    except LlmkitError as e:
        assert file.name in str(e), f"the error does not name {file.name}: {e}"
        return None
    finally:
        file.write_bytes(original)


def rows_kept(original: bytes, what) -> list | None:
    """The rows a JSONL file cut by `what` still holds whole, or None when its last line was cut
    mid-row (what is left of it is not JSON)."""
    try:
        return [json.loads(line) for line in damaged(original, what).decode().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


# ---- the files --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small real files, each written by the code that writes it for users (or taken from tests/data)."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    tok = Tokenizer.train(["the cat sat on the mat. ", "a dog ran in the park! "] * 20, vocab_size=300)
    config = ModelConfig.from_preset("llama-tiny", vocab_size=tok.vocab_size, d_model=32, n_layer=1, n_head=2,
                                     n_kv_head=1, d_ff=64, max_seq_len=64)
    model = Transformer(config)
    hf.save_checkpoint(root / "checkpoint", config, model.state_dict())
    gguf.write_gguf(root / "model.gguf", config, model.state_dict(), tok, quant="Q8_0")
    tok.save_pretrained(root / "tokenizer")
    lora = Transformer(config)
    apply_lora(lora, LoraConfig(r=2, targets=("q", "v")))
    save_adapter(lora, root / "lora")
    save_prompt(PromptTuning(Transformer(config), 3), root / "prompt")
    shutil.copy(ROOT / "tests/data/eval/mc.jsonl", root / "mc.jsonl")
    (root / "mc.yaml").write_text((ROOT / "tests/data/eval/mc.yaml").read_text().replace("tests/data/eval/", ""))
    rows = {
        "sft.jsonl": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
                      {"prompt": "2+2=", "completion": "4"}, {"instruction": "Say yes.", "output": "yes"}],
        "pairs.jsonl": [{"prompt": "Say hi.", "chosen": "hi", "rejected": "no"},
                        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
                         "rejected": [{"role": "assistant", "content": "b"}]}],
        "labelled.jsonl": [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}],
        "documents.jsonl": [{"id": "1", "text": "hello", "source": "s"}, {"id": "2", "text": "world"}],
    }
    for name, content in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in content))
    return root, config, tok


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---- safetensors ------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_checkpoint_safetensors(files, data):
    """model.safetensors: structural damage (the 8-byte length, the JSON header, a cut) fails or loads
    the very same tensors; flips in the data section may change values, never names, shapes or dtypes."""
    root = files[0]
    file = root / "checkpoint" / "model.safetensors"
    original = file.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    _, good = hf.load_checkpoint(root / "checkpoint")
    what = data.draw(damage(len(original), header_end))
    loaded = read_damaged(file, original, what, lambda: hf.load_checkpoint(root / "checkpoint"))
    if loaded is None:
        return
    assert what[0] != "cut", "a truncated file loaded"
    tensors = loaded[1]
    if touches_data(what, header_end):
        assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == {k: (t.shape, t.dtype) for k, t in good.items()}
    else:
        assert same_tensors(tensors, good), f"structural damage {what} loaded different tensors"


@FUZZ
@given(data=st.data())
def test_checkpoint_config_json(files, data):
    """config.json: its values may change (rope_theta, eps), but the weights must still fit it."""
    root = files[0]
    file = root / "checkpoint" / "config.json"
    original = file.read_bytes()
    _, good = hf.load_checkpoint(root / "checkpoint")
    what = data.draw(damage(len(original), len(original)))
    loaded = read_damaged(file, original, what, lambda: hf.load_checkpoint(root / "checkpoint"))
    if loaded is not None:
        assert same_tensors(loaded[1], good)


# ---- GGUF -------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_gguf(files, data):
    """A GGUF file: damage to its header (magic, counts, key and tensor tables, offsets, types,
    dimensions) fails or loads the very same tensors; metadata values (a token's text, rope_theta) and
    tensor data may change, the tensors' names and shapes may not."""
    file = files[0] / "model.gguf"
    original = file.read_bytes()
    good = gguf.read_gguf(file)
    data_start, fields = _tensor_fields(file)
    what = data.draw(damage(len(original), data_start, fields))
    loaded = read_damaged(file, original, what, lambda: gguf.read_gguf(file))
    if loaded is None:
        return
    assert what[0] != "cut", "a truncated file loaded"
    assert {k: t.shape for k, t in loaded.tensors.items()} == {k: t.shape for k, t in good.tensors.items()}
    if not touches_data(what, data_start):
        assert same_tensors(loaded.tensors, good.tensors), f"header damage {what} loaded different tensors"


def _tensor_fields(file: Path) -> tuple[int, list[tuple[int, int]]]:
    """(where the tensor data start, the byte ranges of each tensor's dimensions, type and offset)."""
    reader = GGUFReader(str(file))
    base = reader.data.ctypes.data
    fields = [(part.ctypes.data - base, part.ctypes.data - base + part.nbytes)
              for t in reader.tensors for part in t.field.parts[2:]]
    return reader.data_offset, fields


@FUZZ
@given(data=st.data())
def test_gguf_tokenizer_only(files, data):
    """The metadata-only reader (read_tokenizer parses the header itself, without the gguf package)."""
    file = files[0] / "model.gguf"
    original = file.read_bytes()
    data_start = GGUFReader(str(file)).data_offset
    what = data.draw(damage(len(original), data_start))
    tok = read_damaged(file, original, what, lambda: gguf.read_tokenizer(file))
    assert tok is None or isinstance(tok, Tokenizer)


# ---- tokenizer --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
@FUZZ
@given(data=st.data())
def test_tokenizer_files(files, data, name):
    """tokenizer.json and tokenizer_config.json: a token's text or a template may change; a cut fails
    (or removed only the final newline)."""
    root, _, good = files
    file = root / "tokenizer" / name
    original = file.read_bytes()
    what = data.draw(damage(len(original), len(original)))
    tok = read_damaged(file, original, what, lambda: Tokenizer.from_pretrained(root / "tokenizer"))
    if tok is not None and what[0] == "cut":
        assert not original[what[1]:].strip(), "a truncated file loaded"
        assert tok.encode("the cat sat") == good.encode("the cat sat")


# ---- adapters ---------------------------------------------------------------------------------


def _lora_state(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    return load_adapter(Transformer(config), folder).state_dict()


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
@FUZZ
@given(data=st.data())
def test_lora_adapter_folder(files, data, name):
    """A LoRA adapter folder: structural damage to its safetensors fails or loads the same model; in
    adapter_config.json the numbers (r, lora_alpha, dropout) are values, the keys and types are not."""
    root, config, _ = files
    file = root / "lora" / name
    original = file.read_bytes()
    torch.manual_seed(1)
    good = _lora_state(root / "lora", config)
    header_end = 8 + int.from_bytes(original[:8], "little") if name.endswith(".safetensors") else len(original)
    what = data.draw(damage(len(original), header_end))
    torch.manual_seed(1)  # the same base weights as `good`
    state = read_damaged(file, original, what, lambda: _lora_state(root / "lora", config))
    if state is not None and name.endswith(".safetensors") and not touches_data(what, header_end):
        assert same_tensors(state, good), f"structural damage {what} loaded a different adapter"


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
@FUZZ
@given(data=st.data())
def test_prompt_tuning_adapter_folder(files, data, name):
    """A prompt-tuning adapter folder: as the LoRA one."""
    root, config, _ = files
    file = root / "prompt" / name
    original = file.read_bytes()
    good = load_prompt(Transformer(config), root / "prompt").prompt.detach().clone()
    header_end = 8 + int.from_bytes(original[:8], "little") if name.endswith(".safetensors") else len(original)
    what = data.draw(damage(len(original), header_end))
    tuned = read_damaged(file, original, what, lambda: load_prompt(Transformer(config), root / "prompt"))
    if tuned is not None and name.endswith(".safetensors") and not touches_data(what, header_end):
        assert torch.equal(tuned.prompt.detach(), good), f"structural damage {what} loaded a different prompt"


# ---- task YAML and JSONL data -----------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_task_yaml(files, data):
    """An lm-eval task YAML (and the docs it points at): a value (the description, a delimiter) may
    change; a damaged key or a wrong type fails; a cut fails or keeps the keys before it."""
    file = files[0] / "mc.yaml"
    original = file.read_bytes()
    good = _settings(task_from_file(file))
    what = data.draw(damage(len(original), len(original)))
    task = read_damaged(file, original, what, lambda: _loaded(task_from_file(file)))
    if task is not None and what[0] == "cut":
        assert _settings(task) == good, "a cut file loaded other settings"


def _loaded(task):
    task.load()  # the docs it points at
    return task


def _settings(task) -> tuple:
    return (task.name, task.kind, task.description, task.target_delimiter, task.fewshot_delimiter, task.until,
            task.max_gen_toks, task.answer_regex, task.group_select, task.fallback, task.load())


READERS = {  # JSONL file -> its reader, and what it returns for the original rows (to compare with)
    "mc.jsonl": lambda f, tok: task_from_file(f).load(),
    "sft.jsonl": lambda f, tok: [(e.input_ids, e.scored) for e in load_examples(f, tok)],
    "pairs.jsonl": lambda f, tok: [(p.prompt, p.chosen, p.rejected) for p in read_preference_pairs(f)],
    "labelled.jsonl": lambda f, tok: [(r.text, r.label) for r in read_labelled(str(f), 2)],
    "documents.jsonl": lambda f, tok: [(d.id, d.text) for d in read_documents(f)],
}


@pytest.mark.parametrize("name", sorted(READERS))
@FUZZ
@given(data=st.data())
def test_jsonl_data(files, data, name):
    """JSONL readers (eval docs, SFT rows, preference pairs, labelled rows, prepared documents): a cut
    fails or loads exactly the rows of the complete lines before it; flips change text or fail."""
    root, _, tok = files
    file, read = root / name, READERS[name]
    original = file.read_bytes()
    good = read(file, tok)
    what = data.draw(damage(len(original), len(original)))
    loaded = read_damaged(file, original, what, lambda: read(file, tok))
    if what[0] == "cut" and loaded is not None:
        kept = rows_kept(original, what)
        assert kept is not None, "a row cut in half loaded"
        assert loaded == good[:len(kept)], "a cut file loaded rows it no longer holds"
