"""Every ```bash block of README.md and docs/*.md runs, in order per file, in a scratch directory.

Blocks of one file run as one bash script (`set -euo pipefail`), so later blocks see the files and
variables of earlier ones; `$GPTFORGE_REPO` is the repository root. README's install commands (blocks
with `pip install`) are skipped: CI runs them through .ci/run. Commands that cannot run offline on one
CPU belong in ```text blocks.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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
    blocks = bash_blocks(path)
    if path.name == "README.md":
        blocks = [(n, code) for n, code in blocks if "pip install" not in code]
    return blocks


def test_fence_parser(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\necho one\n```\n```text\nnot run\n```\n```python\nx = 1\n```\n"
                   "- item\n  ```bash\n  echo two\n  ```\n")
    assert bash_blocks(doc) == [(3, "echo one"), (13, "echo two")]


def _script(path: Path, blocks: list[tuple[int, str]]) -> str:
    parts = ["set -euo pipefail"]
    for index, (line, code) in enumerate(blocks, start=1):
        parts.append(f"echo '### {path.name} block {index} (line {line})' >&2")
        parts.append(code)
    return "\n".join(parts) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: p.name)
def test_doc_bash_blocks_run(doc, tmp_path):
    if not doc.exists():
        pytest.skip(f"{doc.name} not written yet")
    blocks = runnable_blocks(doc)
    if not blocks:
        pytest.skip(f"{doc.name} has no bash blocks")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "GPTFORGE_REPO": str(REPO), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MPLBACKEND": "Agg", "HOME": str(tmp_path)}
    script = scratch / "snippets.sh"
    script.write_text(_script(doc, blocks))
    try:
        result = subprocess.run(["bash", str(script)], cwd=scratch, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{doc.name}: snippets ran over {TIMEOUT_S}s; use tiny settings\n{(exc.stderr or '')[-3000:]}")
    if result.returncode != 0:
        markers = re.findall(r"### (.+)", result.stderr)
        where = markers[-1] if markers else "before the first block"
        pytest.fail(f"{where} failed with exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n"
                    f"--- stderr ---\n{result.stderr[-5000:]}")
