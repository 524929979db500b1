"""Run every ```bash block of README.md and docs/*.md, in order per file, each file in a scratch directory.

    python tools/run_doc_snippets.py                       # with this interpreter's environment
    python tools/run_doc_snippets.py --venv .ci/venv       # with a virtual environment's gptforge and python
    python tools/run_doc_snippets.py docs/prepare.md       # some files only

Blocks of one file run as one bash script (`set -euo pipefail`), so later blocks see the files and
variables of earlier ones; `$GPTFORGE_REPO` is the repository root. README's install commands (blocks
with `pip install`) are skipped: they are what builds the environment. Commands that cannot run offline
on one CPU belong in ```text blocks. CI (.ci/run) runs this against a venv built by README command 1
alone; tests/docs/test_doc_snippets.py runs it with the test environment. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
TIMEOUT_S = 420


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, code) of each ```bash / ```sh / ```shell block in a Markdown file."""
    blocks, current, start, indent = [], None, 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if current is None:
            if match and match.group(2) in ("bash", "sh", "shell", "console"):
                current, start, indent = [], number + 1, match.group(1)
            elif match and match.group(2):
                current, start, indent = False, number + 1, match.group(1)  # another language: skip its body
        elif match and not match.group(2):
            if current is not False:
                blocks.append((start, "\n".join(l[len(indent):] if l.startswith(indent) else l for l in current)))
            current = None
        elif current is not False:
            current.append(line)
    return blocks


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """The blocks to run: all of them, except README's install commands."""
    blocks = bash_blocks(path)
    if path.name == "README.md":
        blocks = [(n, code) for n, code in blocks if "pip install" not in code]
    return blocks


def script(path: Path, blocks: list[tuple[int, str]]) -> str:
    """One bash script for a file's blocks; a marker line on stderr says which block runs."""
    parts = ["set -euo pipefail"]
    for index, (line, code) in enumerate(blocks, start=1):
        parts.append(f"echo '### {path.name} block {index} (line {line})' >&2")
        parts.append(code)
    return "\n".join(parts) + "\n"


def snippet_env(home: Path, bin_dir: Path) -> dict[str, str]:
    """The environment snippets run in: `bin_dir` first on PATH, offline, two threads, a scratch HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"GPTFORGE_REPO": str(REPO), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "MPLBACKEND": "Agg", "HOME": str(home)})
    if os.environ.get("PYTHONPATH") and bin_dir == Path(sys.executable).parent:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # same interpreter: keep what it was started with
    return env


@dataclass
class DocRun:
    """The outcome of one file's snippets."""

    doc: Path
    blocks: int
    returncode: Optional[int]  # None: timed out
    seconds: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def failed_block(self) -> str:
        """'README.md block 3 (line 60)': the last block that started."""
        markers = re.findall(r"### (.+)", self.stderr)
        return markers[-1] if markers else "before the first block"

    def report(self) -> str:
        """A line for a passing file; the failing block, its exit status and the output tails otherwise."""
        if self.ok:
            return f"{self.doc.name}: {self.blocks} block(s) passed in {self.seconds:.0f} s"
        why = f"ran over {TIMEOUT_S} s" if self.returncode is None else f"failed with exit {self.returncode}"
        return (f"{self.doc.name}: {self.failed_block} {why}\n--- stdout ---\n{self.stdout[-3000:]}\n"
                f"--- stderr ---\n{self.stderr[-5000:]}")


def run_doc(doc: Path, workdir: Path, bin_dir: Optional[Path] = None, timeout: float = TIMEOUT_S) -> Optional[DocRun]:
    """Run a file's snippets in `workdir` (scratch/ and a HOME are made in it); None when it has no blocks."""
    blocks = runnable_blocks(doc)
    if not blocks:
        return None
    bin_dir = bin_dir or Path(sys.executable).parent
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "snippets.sh"
    path.write_text(script(doc, blocks), encoding="utf-8")
    started = time.perf_counter()
    # Output goes to files, not pipes: a background process a block starts (a server) would hold a pipe open
    # after bash exits. The script gets a session of its own, so such processes end with the file's run,
    # also when a block fails before the line that would stop them.
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(out_path, "w", encoding="utf-8") as out, open(err_path, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(["bash", str(path)], cwd=scratch, env=snippet_env(workdir, bin_dir), stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
        returncode: Optional[int]
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            _end_session(proc)
    return DocRun(doc, len(blocks), returncode, time.perf_counter() - started,
                  out_path.read_text(encoding="utf-8", errors="replace"),
                  err_path.read_text(encoding="utf-8", errors="replace"))


def _end_session(proc: subprocess.Popen) -> None:
    """Stop whatever is left of the snippet script's process group (SIGTERM, then SIGKILL)."""
    if os.name == "nt":
        proc.kill()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.5 if sig == signal.SIGTERM else 0)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    """Run the snippets of the given files (default: README and docs/); exit 1 when any fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="a virtual environment whose bin/ (gptforge, python) the snippets use")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds per file (default {TIMEOUT_S})")
    args = parser.parse_args(argv)
    bin_dir = None
    if args.venv is not None:
        bin_dir = args.venv.resolve() / ("Scripts" if os.name == "nt" else "bin")
        if not (bin_dir / "gptforge").exists() and not (bin_dir / "gptforge.exe").exists():
            parser.error(f"--venv {args.venv}: no gptforge in {bin_dir} (install the package into it first)")
    failures = 0
    for doc in [f.resolve() for f in args.files] or DOC_FILES:
        with tempfile.TemporaryDirectory(prefix=f"snippets-{doc.stem}-") as workdir:
            outcome = run_doc(doc, Path(workdir), bin_dir, args.timeout)
        if outcome is None:
            print(f"{doc.name}: no bash blocks", flush=True)
            continue
        print(outcome.report(), flush=True)
        failures += not outcome.ok
    print(f"{failures} file(s) failed" if failures else "all snippets passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
