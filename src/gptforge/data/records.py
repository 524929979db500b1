"""Reading data files: the one JSONL reader and the `Record` every data path uses.

Fine-tuning data (`data/sft.py`), evaluation tasks (`eval/tasks.py`) and pretraining corpora
(`data/corpus.py`) all read JSON lines through `iter_jsonl`, so an error reads the same everywhere:
`file.jsonl:3: invalid JSON: ...`, `file.jsonl:3 field 'label': ...`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line (JSONL, CSV with header = line 1) or item/row number (JSON, Parquet, HF)

    def where(self, field: Optional[str] = None) -> str:
        """`file:line` (or `file record N`), plus the field, for error messages."""
        at = f"{self.source}:{self.line}" if self.source.endswith((*JSONL_SUFFIXES, ".csv")) else \
            f"{self.source} record {self.line}"
        return at + (f" field {field!r}" if field else "")

    def text(self, field: str, *, required: bool = True, allow_empty: bool = False) -> str:
        """The string value of `field`, or a DataError naming file, line and field."""
        if field not in self.data or self.data[field] is None:
            if not required:
                return ""
            raise DataError(f"{self.where(field)}: missing (record has {sorted(self.data)})")
        value = self.data[field]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and field in ("label", "answer", "target"):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{self.where(field)}: expected a string, got {type(value).__name__} {value!r}"[:300])
        if not value.strip() and not allow_empty:
            raise DataError(f"{self.where(field)}: empty string")
        return value


def iter_jsonl(path: str | Path, lines: Optional[Iterable[str]] = None,
               error: type[DataError] = DataError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file (or of `lines` read from it).

    Blank lines are skipped; a line that is not a JSON object raises `error` naming `path:line`.
    """
    path = Path(path)
    if lines is None:
        if not path.is_file():
            raise error(f"data file not found: {path}")
        with path.open(encoding="utf-8") as handle:
            yield from iter_jsonl(path, handle, error)
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(value, dict):
            raise error(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value


def read_records(path: str | Path) -> list[Record]:
    """All records of a JSONL/JSON/CSV/Parquet file (or `hf:NAME[:SPLIT]`), with their line numbers."""
    spec = str(path)
    if spec.startswith("hf:"):
        return _read_hf(spec)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = [Record(data, str(path), number) for number, data in iter_jsonl(path)]
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(item).__name__}")
    return [Record(item, str(path), i) for i, item in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # DictReader.line_num counts physical lines, so quoted multi-line cells keep the right number.
        return [Record({k: v for k, v in row.items() if k is not None}, str(path), reader.line_num) for row in reader]


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with `datasets`
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from exc
    return [Record(row, str(path), i) for i, row in enumerate(rows, start=1)]


def _read_hf(spec: str) -> list[Record]:
    parts = spec[3:].split(":")
    name, split = parts[0], parts[1] if len(parts) > 1 else "train"
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover
        raise DataError(f"{spec}: Hugging Face datasets need `pip install datasets`") from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, bad split: the library's message says which
        raise DataError(f"{spec}: cannot load Hugging Face dataset {name!r} split {split!r}: {exc}") from exc
    records = [Record(dict(row), spec, i) for i, row in enumerate(dataset, start=1)]
    if not records:
        raise DataError(f"{spec}: no records")
    return records


__all__ = ["Record", "iter_jsonl", "read_records", "DataError", "JSONL_SUFFIXES"]
