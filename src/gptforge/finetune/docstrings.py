"""The docstring task: (function code without its docstring) -> (the docstring's first line), from the
Python standard library, parsed with `ast` and split by top-level package so that no module's functions
appear in two splits.

    python -m gptforge.finetune.docstrings data/docstrings     # writes train/val/test.jsonl + stats.json

Each record: {"prompt": "<code>\\n# summary:", "completion": " <summary>", "name", "qualname", "module"}.
The `name` field feeds the baseline that "predicts" the summary by copying the function name.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import textwrap
import zlib
from pathlib import Path
from typing import Iterator, Optional

from ..atomic import atomic_write_text

PROMPT_SUFFIX = "\n# summary:"
# Folders of the stdlib that are tests, demos or vendored code, not library code.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo",
             "ensurepip", "lib2to3", "pydoc_data", "config-3", "venv"}
SPLITS = (("train", 80), ("val", 90), ("test", 100))  # cumulative percent of top-level packages


def stdlib_root() -> Path:
    """The folder of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every .py file under `root`, skipping tests and vendored code."""
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith(("config-", "test_")) for p in parts):
            continue
        name = ".".join(parts)[:-3]
        if name.endswith(".__init__"):
            name = name[:-9]
        yield name, path


def summary_line(docstring: str) -> str:
    """The first non-empty line of a docstring, stripped."""
    for line in docstring.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def extract_functions(source: str, module: str, *, max_lines: int = 12, min_summary: int = 10,
                      max_summary: int = 100) -> list[dict[str, str]]:
    """Docstring records of every documented function/method in `source` (see the module docstring)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    records = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                record = _record(child, lines, module, prefix, max_lines, min_summary, max_summary)
                if record:
                    records.append(record)

    visit(tree, "")
    return records


def _record(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], module: str, prefix: str,
            max_lines: int, min_summary: int, max_summary: int) -> Optional[dict[str, str]]:
    docstring = ast.get_docstring(node)
    if not docstring or len(node.body) < 2:
        return None  # undocumented, or nothing but a docstring: no code to summarize
    summary = summary_line(docstring)
    if not (min_summary <= len(summary) <= max_summary) or not summary[0].isalpha():
        return None
    doc = node.body[0]
    start, end = node.lineno - 1, node.end_lineno or node.lineno
    # The code without the docstring's lines (the answer must not be in the question).
    kept = [line for i, line in enumerate(lines[start:end], start=start)
            if not (doc.lineno - 1 <= i <= (doc.end_lineno or doc.lineno) - 1)]
    code = textwrap.dedent("\n".join(kept[:max_lines])).rstrip()
    if not code or "\t" in code:
        return None
    return {"prompt": code + PROMPT_SUFFIX, "completion": " " + summary, "name": node.name,
            "qualname": prefix + node.name, "module": module}


def split_of(module: str) -> str:
    """train / val / test by a stable hash of the top-level package (80/10/10 of packages)."""
    bucket = zlib.crc32(module.split(".")[0].encode()) % 100
    return next(name for name, upper in SPLITS if bucket < upper)


def extract_docstring_pairs(root: Optional[Path] = None, *, max_lines: int = 12) -> dict[str, list[dict[str, str]]]:
    """All records of the standard library (or `root`), grouped by split."""
    root = Path(root) if root else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"source folder not found: {root}")
    splits: dict[str, list[dict[str, str]]] = {name: [] for name, _ in SPLITS}
    for module, path in iter_modules(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        splits[split_of(module)].extend(extract_functions(source, module, max_lines=max_lines))
    return splits


def write_docstring_dataset(out_dir: str | Path, root: Optional[Path] = None, *, max_lines: int = 12) -> dict[str, int]:
    """Write train/val/test.jsonl and stats.json into `out_dir`; returns the record counts."""
    out = Path(out_dir)
    splits = extract_docstring_pairs(root, max_lines=max_lines)
    if not any(splits.values()):
        raise ValueError(f"no documented functions found under {root or stdlib_root()}")
    counts = {}
    for name, records in splits.items():
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        counts[name] = len(records)
    modules = {name: len({r["module"].split(".")[0] for r in records}) for name, records in splits.items()}
    atomic_write_text(out / "stats.json", json.dumps({"records": counts, "packages": modules,
                                                      "python": sys.version.split()[0]}, indent=2))
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: write the dataset."""
    parser = argparse.ArgumentParser(description="Extract (code -> docstring summary) pairs from the stdlib.")
    parser.add_argument("out_dir", help="folder for train/val/test.jsonl")
    parser.add_argument("--root", default=None, help="source folder (default: this Python's standard library)")
    parser.add_argument("--max-lines", type=int, default=12, help="code lines kept per function")
    args = parser.parse_args(argv)
    counts = write_docstring_dataset(args.out_dir, Path(args.root) if args.root else None, max_lines=args.max_lines)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["extract_docstring_pairs", "extract_functions", "write_docstring_dataset", "split_of", "summary_line"]
