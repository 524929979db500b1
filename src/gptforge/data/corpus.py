"""Corpora: turn source specs into a deterministic stream of text documents.

A source spec is one of
    path/to/file.txt, path/to/folder, "path/**/*.md"   text files (folders and globs recurse, sorted)
    data.jsonl, data.parquet                              one document per record, from `text_field`
    stdlib                                                the running interpreter's standard library .py files,
                                                          curated (see `curate_stdlib`)
    hf:NAME[:CONFIG][@SPLIT]                              a Hugging Face dataset (needs `datasets` and network)
Documents come out in a fixed order: sources in the order given, files sorted by path.

The `stdlib` source is curated: machine-generated files (codec tables, Unicode and entity tables,
generated help text) are left out by a content rule plus a short named list, exact duplicates are
removed, and when `max_bytes` caps the corpus the files are a deterministic sample spread over the
whole library rather than its alphabetical head. `Corpus.selections` says what was kept and why the
rest was not.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import re
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


# ---- curating the standard library ---------------------------------------------------------------

# Bump when a rule below changes: prepared folders fingerprint it and are rebuilt.
CURATION_VERSION = 1
# A file is literal data when more than this share of its non-blank lines are data lines.
DATA_LINE_SHARE = 0.5
# A line this long is embedded data (a blob, a minified table), not code a person wrote.
LONG_LINE_CHARS = 1000
# Generated files the content rule may not catch, by path prefix relative to the library root.
STDLIB_NAMED_EXCLUSIONS = {
    "pydoc_data/": "generated help text (pydoc topics)",
    "_sysconfigdata_": "build configuration dump written by the interpreter's build",
    "re/_casefix.py": "generated case-folding table",
    "__phello__/": "frozen-module test fixture",
}
RULES = {
    "named": "named generated files",
    "literal_data": f"literal tables (over {DATA_LINE_SHARE:.0%} of lines are only literals)",
    "long_lines": f"embedded data (a line over {LONG_LINE_CHARS} characters)",
    "duplicate": "exact duplicate of a file kept earlier",
    "empty": "no text",
    "max_bytes": "left out of the max_bytes sample",
}

_STRING = re.compile(r"""[rRbBuUfF]{0,2}(?:'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")""")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_]*\.?\d*(?:[eE][-+]?\d+)?[jJ]?)(?![\w.])")
_TRIPLE_QUOTE = re.compile(r"""[rRbBuUfF]{0,2}(?:'''|\"\"\")""")
_ONLY_PUNCTUATION = re.compile(r"[\s,:;()\[\]{}+\-*/|.=<>]*")


def is_data_line(line: str) -> bool:
    """True for a line made only of literals and punctuation, e.g. `0x80: 0x00c7,  # LATIN ...` or `'abc',`.

    The line must hold at least one string or number literal; names, keywords or calls make it code.
    Comments are ignored, so a table row with a trailing comment still counts as data.
    """
    code, quotes = _TRIPLE_QUOTE.subn(" ", line.strip())
    code, strings = _STRING.subn(" ", code)
    code = code.split("#", 1)[0]
    code, numbers = _NUMBER.subn(" ", code)
    return strings + numbers > 0 and _ONLY_PUNCTUATION.fullmatch(code) is not None and quotes == 0


def data_line_share(text: str) -> float:
    """Share of the non-blank lines of `text` that are data lines (see `is_data_line`); 0 for empty text."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return sum(1 for line in lines if is_data_line(line)) / len(lines)


def machine_generated_rule(text: str) -> Optional[str]:
    """The `RULES` key that marks `text` as generated data rather than code a person wrote, or None."""
    if any(len(line) > LONG_LINE_CHARS for line in text.splitlines()):
        return "long_lines"
    if data_line_share(text) > DATA_LINE_SHARE:
        return "literal_data"
    return None


def _named_exclusion(relative: str) -> Optional[str]:
    for prefix in STDLIB_NAMED_EXCLUSIONS:
        if relative.startswith(prefix):
            return prefix
    return None


@dataclass
class Selection:
    """What a curated source kept and left out: counts and bytes per rule, with a few example paths."""

    source: str
    files_in: int = 0
    bytes_in: int = 0
    kept_files: int = 0
    kept_bytes: int = 0
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)  # rule -> {files, bytes, examples}

    def drop(self, rule: str, name: str, size: int) -> None:
        entry = self.dropped.setdefault(rule, {"reason": RULES[rule], "files": 0, "bytes": 0, "examples": []})
        entry["files"] += 1
        entry["bytes"] += size
        if len(entry["examples"]) < 5:
            entry["examples"].append(name)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "files_in": self.files_in, "bytes_in": self.bytes_in,
                "kept_files": self.kept_files, "kept_bytes": self.kept_bytes, "dropped": self.dropped}

    def summary(self) -> str:
        """One sentence for people: kept N files (X MB) of M; left out per rule."""
        parts = [f"{e['files']} {e['reason']} ({e['bytes'] / 1e6:.2f} MB)" for e in self.dropped.values()]
        left = "; left out: " + ", ".join(parts) if parts else ""
        return (f"{self.source}: kept {self.kept_files} of {self.files_in} files "
                f"({self.kept_bytes / 1e6:.2f} of {self.bytes_in / 1e6:.2f} MB){left}")


def _sample_key(relative: str) -> bytes:
    return hashlib.sha256(relative.encode("utf-8")).digest()


def curate_stdlib(max_bytes: Optional[int] = None, root: Optional[Path] = None,
                  files: Optional[list[Path]] = None) -> tuple[list[Path], Selection]:
    """The standard library files worth training on, in path order, and what was left out and why.

    Rules, in order: the named list (`STDLIB_NAMED_EXCLUSIONS`), embedded data (a line longer than
    `LONG_LINE_CHARS`), literal tables (more than `DATA_LINE_SHARE` of non-blank lines are data lines),
    exact duplicates (same bytes as a file earlier in path order). With `max_bytes`, whole files are
    taken in the order of a hash of their relative path (a fixed pseudo-random order, so the sample is
    spread over every package and the same on every run) while they fit.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files() if files is None else sorted(files, key=lambda p: p.relative_to(root).as_posix())
    selection = Selection("stdlib")
    seen: set[bytes] = set()
    candidates: list[tuple[Path, str, int]] = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        data = path.read_bytes()
        selection.files_in += 1
        selection.bytes_in += len(data)
        text = data.decode("utf-8-sig", errors="replace")
        digest = hashlib.sha256(data).digest()
        rule = "named" if _named_exclusion(relative) else None
        rule = rule or ("empty" if not text.strip() else None) or machine_generated_rule(text)
        rule = rule or ("duplicate" if digest in seen else None)
        if rule:
            selection.drop(rule, relative, len(data))
            continue
        seen.add(digest)
        candidates.append((path, relative, len(data)))
    chosen = candidates
    if max_bytes is not None and sum(size for *_, size in candidates) > max_bytes:
        chosen, room = [], max_bytes
        for item in sorted(candidates, key=lambda c: _sample_key(c[1])):
            if item[2] <= room:
                chosen.append(item)
                room -= item[2]
            else:
                selection.drop("max_bytes", item[1], item[2])
        chosen.sort(key=lambda c: c[1])
    selection.kept_files = len(chosen)
    selection.kept_bytes = sum(size for *_, size in chosen)
    return [path for path, *_ in chosen], selection


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
    selection: Optional[Selection] = None  # curated sources: what was kept and left out


def resolve_source(spec: str, max_bytes: Optional[int] = None) -> ResolvedSource:
    """Expand one source spec; missing paths and empty globs raise CorpusError naming the spec.

    `max_bytes` lets a curated source (stdlib) sample its files instead of being cut at the end.
    """
    spec = str(spec)
    if spec == "stdlib":
        files, selection = curate_stdlib(max_bytes)
        return ResolvedSource(spec, "stdlib", files, selection=selection)
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
        self.sources = [resolve_source(s, max_bytes) for s in sources]
        self.skipped: list[str] = []
        self._warned: set[str] = set()  # documents() runs twice (tokenizer, shards): warn once per file

    @property
    def selections(self) -> list[Selection]:
        """What each curated source kept and left out (empty when no source is curated)."""
        return [s.selection for s in self.sources if s.selection is not None]

    def input_bytes(self) -> Optional[int]:
        """Total size of the input files (None when a source is a remote dataset)."""
        if any(s.kind == "hf" for s in self.sources):
            return None
        total = sum(p.stat().st_size for s in self.sources for p in s.files)
        return min(total, self.max_bytes) if self.max_bytes else total

    def fingerprint(self) -> str:
        """Hash of what the corpus reads (specs, file paths, sizes, mtimes, options): equal means unchanged."""
        h = hashlib.sha256()
        items: list[Any] = [self.text_field, self.on_decode_error, self.max_bytes, sys.version_info[:3],
                            CURATION_VERSION]
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


__all__ = ["Corpus", "CorpusError", "Document", "ResolvedSource", "Selection", "iter_documents", "resolve_source",
           "stdlib_files", "stdlib_root", "curate_stdlib", "is_data_line", "data_line_share", "machine_generated_rule",
           "DECODE_ERROR_POLICIES", "STDLIB_NAMED_EXCLUSIONS", "RULES"]
