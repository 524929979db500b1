"""Corpora: turn source specs into a deterministic stream of text documents.

A source spec is one of
    path/to/file.txt, path/to/folder, "path/**/*.md"   text files (folders and globs recurse, sorted)
    data.jsonl, data.parquet                              one document per record, from `text_field`
    stdlib                                                the running interpreter's standard library .py files
    hf:NAME[:CONFIG][@SPLIT]                              a Hugging Face dataset (needs `datasets` and network)
Documents come out in a fixed order: sources in the order given, files sorted by path.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import DataError
from .records import iter_jsonl

log = logging.getLogger(__name__)

DECODE_ERROR_POLICIES = ("fail", "skip")
RECORD_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# Parts of the stdlib tree that are not the library itself (installed packages, test suites, fixtures).
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


class CorpusError(DataError):
    """A corpus source is missing, empty or unreadable; the message names it."""


@dataclass
class Document:
    """One unit of text; `name` says where it came from (file path, file:line, dataset row)."""

    name: str
    text: str


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own .py files (no site-packages, no test suites), sorted."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(files, key=lambda p: p.as_posix())


@dataclass
class ResolvedSource:
    """A source spec expanded to concrete inputs."""

    spec: str
    kind: str  # text | jsonl | parquet | stdlib | hf
    files: list[Path] = field(default_factory=list)
    hf: Optional[tuple[str, Optional[str], str]] = None  # (name, config, split)


def resolve_source(spec: str) -> ResolvedSource:
    """Expand one source spec; missing paths and empty globs raise CorpusError naming the spec."""
    spec = str(spec)
    if spec == "stdlib":
        return ResolvedSource(spec, "stdlib", stdlib_files())
    if spec.startswith("hf:"):
        body = spec[3:]
        split = "train"
        if "@" in body:
            body, split = body.rsplit("@", 1)
        name, _, config = body.partition(":")
        if not name:
            raise CorpusError(f"source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
        return ResolvedSource(spec, "hf", hf=(name, config or None, split))
    path = Path(spec).expanduser()
    if _is_glob(spec):
        files = sorted((Path(p) for p in globlib.glob(str(path), recursive=True)), key=lambda p: p.as_posix())
        files = [p for p in files if p.is_file()]
        if not files:
            raise CorpusError(f"source {spec!r}: no files match this pattern")
    elif path.is_dir():
        files = _folder_files(path)
        if not files:
            raise CorpusError(f"source {spec!r}: folder has no files")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"source {spec!r}: no such file or folder")
    kinds = {RECORD_SUFFIXES.get(p.suffix.lower(), "text") for p in files}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return ResolvedSource(spec, kind, files)


class Corpus:
    """Documents from a list of source specs, in a fixed order; `skipped` lists undecodable files."""

    def __init__(self, sources: list[str] | str, text_field: str = "text", on_decode_error: str = "fail",
                 max_bytes: Optional[int] = None) -> None:
        if isinstance(sources, str):
            sources = [sources]
        if not sources:
            raise CorpusError("no corpus sources given (files, folders, globs, 'stdlib' or hf:NAME)")
        if on_decode_error not in DECODE_ERROR_POLICIES:
            raise CorpusError(f"on_decode_error must be one of {DECODE_ERROR_POLICIES}, got {on_decode_error!r}")
        if max_bytes is not None and max_bytes <= 0:
            raise CorpusError(f"max_bytes must be positive, got {max_bytes}")
        self.text_field = text_field
        self.on_decode_error = on_decode_error
        self.max_bytes = max_bytes
        self.sources = [resolve_source(s) for s in sources]
        self.skipped: list[str] = []
        self._warned: set[str] = set()  # documents() runs twice (tokenizer, shards): warn once per file

    def input_bytes(self) -> Optional[int]:
        """Total size of the input files (None when a source is a remote dataset)."""
        if any(s.kind == "hf" for s in self.sources):
            return None
        total = sum(p.stat().st_size for s in self.sources for p in s.files)
        return min(total, self.max_bytes) if self.max_bytes else total

    def fingerprint(self) -> str:
        """Hash of what the corpus reads (specs, file paths, sizes, mtimes, options): equal means unchanged."""
        h = hashlib.sha256()
        items: list[Any] = [self.text_field, self.on_decode_error, self.max_bytes, sys.version_info[:3]]
        for source in self.sources:
            items.append([source.spec, source.kind, source.hf])
            for p in source.files:
                st = p.stat()
                items.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        h.update(json.dumps(items, default=str).encode())
        return h.hexdigest()

    def documents(self) -> Iterator[Document]:
        """Yield documents in order (stops once `max_bytes` of text has been produced)."""
        self.skipped = []
        produced = 0
        for source in self.sources:
            for doc in self._source_documents(source):
                if not doc.text:
                    continue
                if self.max_bytes is not None:
                    room = self.max_bytes - produced
                    if room <= 0:
                        return
                    size = len(doc.text.encode("utf-8"))
                    if size > room:  # cut at a character boundary inside the byte budget
                        doc = Document(doc.name, doc.text.encode("utf-8")[:room].decode("utf-8", "ignore"))
                        size = room
                    produced += size
                yield doc

    # ---- per kind ----
    def _source_documents(self, source: ResolvedSource) -> Iterator[Document]:
        if source.kind == "hf":
            yield from self._hf_documents(source)
            return
        for path in source.files:
            kind = RECORD_SUFFIXES.get(path.suffix.lower(), "text")
            if kind == "jsonl":
                yield from self._jsonl_documents(path)
            elif kind == "parquet":
                yield from self._parquet_documents(path)
            else:
                text = self._read_text(path)
                if text is not None:
                    yield Document(str(path), text)

    def _read_text(self, path: Path) -> Optional[str]:
        data = path.read_bytes()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            message = f"{path}: not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r})"
            if self.on_decode_error == "skip":
                if str(path) not in self._warned:
                    self._warned.add(str(path))
                    log.warning("%s; skipped", message)
                self.skipped.append(str(path))
                return None
            raise CorpusError(message + "; convert it to UTF-8, or pass --on-decode-error skip "
                              "(data.on_decode_error: skip) to leave such files out") from exc

    def _jsonl_documents(self, path: Path) -> Iterator[Document]:
        text = self._read_text(path)
        if text is None:
            return
        for lineno, record in iter_jsonl(path, text.splitlines(), error=CorpusError):
            if self.text_field not in record:
                keys = sorted(record)
                raise CorpusError(f"{path}:{lineno}: no text field {self.text_field!r} (found {keys}); "
                                  "set --text-field (data.text_field)")
            value = record[self.text_field]
            if not isinstance(value, str):
                raise CorpusError(f"{path}:{lineno}: field {self.text_field!r} must be a string, "
                                  f"got {type(value).__name__}")
            yield Document(f"{path}:{lineno}", value)

    def _parquet_documents(self, path: Path) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise CorpusError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        try:
            pf = pq.ParquetFile(str(path))
        except Exception as exc:  # pyarrow raises its own ArrowInvalid for non-Parquet bytes
            raise CorpusError(f"{path}: not a readable Parquet file: {exc}") from exc
        columns = pf.schema_arrow.names
        if self.text_field not in columns:
            raise CorpusError(f"{path}: no column {self.text_field!r} (columns: {columns}); set --text-field")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is not None:
                    yield Document(f"{path}#{row}", str(value))

    def _hf_documents(self, source: ResolvedSource) -> Iterator[Document]:
        name, config, split = source.hf  # type: ignore[misc]
        try:
            import datasets
        except ImportError as exc:
            raise CorpusError(f"source {source.spec!r} needs the `datasets` package (pip install datasets)") from exc
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # offline: ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, ...
            raise CorpusError(
                f"cannot load Hugging Face dataset {name!r} (config={config!r}, split={split!r}): "
                f"{type(exc).__name__}: {exc}. Loading a hub dataset needs network access or a local "
                "`datasets` cache; offline, pass local files, JSONL/Parquet or 'stdlib' instead") from exc
        if self.text_field not in ds.column_names:
            raise CorpusError(f"dataset {name!r}: no column {self.text_field!r} (columns: {ds.column_names}); "
                              "set --text-field")
        for i, value in enumerate(ds[self.text_field]):
            if value:
                yield Document(f"{source.spec}#{i}", str(value))


def iter_documents(sources: list[str] | str, text_field: str = "text", on_decode_error: str = "fail",
                   max_bytes: Optional[int] = None) -> Iterator[Document]:
    """Documents of `sources` in deterministic order (see the module docstring for the spec syntax)."""
    return Corpus(sources, text_field, on_decode_error, max_bytes).documents()


__all__ = ["Corpus", "CorpusError", "Document", "ResolvedSource", "iter_documents", "resolve_source",
           "stdlib_files", "stdlib_root", "DECODE_ERROR_POLICIES"]
