"""Every ```bash block of README.md and docs/*.md runs, in order per file, in a scratch directory.

The runner is tools/run_doc_snippets.py (CI also runs it against a venv built by README command 1
alone); here it runs with the test environment's interpreter.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("run_doc_snippets", REPO / "tools" / "run_doc_snippets.py")
snippets = importlib.util.module_from_spec(_spec)
sys.modules["run_doc_snippets"] = snippets  # dataclasses look their module up by name
_spec.loader.exec_module(snippets)
bash_blocks = snippets.bash_blocks  # shared with test_pages.py


def test_fence_parser(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```bash\necho one\n```\n```text\nnot run\n```\n```python\nx = 1\n```\n"
                   "- item\n  ```bash\n  echo two\n  ```\n")
    assert snippets.bash_blocks(doc) == [(3, "echo one"), (13, "echo two")]


def test_runner_reports_the_failing_block(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("```bash\necho fine\n```\n\n```bash\necho broken >&2\nfalse\necho never\n```\n")
    outcome = snippets.run_doc(doc, tmp_path / "work", timeout=60)
    assert not outcome.ok and outcome.returncode == 1
    assert outcome.failed_block == "guide.md block 2 (line 6)"
    assert "fine" in outcome.stdout and "never" not in outcome.stdout and "broken" in outcome.stderr
    assert "guide.md block 2 (line 6) failed with exit 1" in outcome.report()
    assert snippets.main([str(doc)]) == 1


def test_readme_install_blocks_are_left_to_ci():
    blocks = snippets.runnable_blocks(REPO / "README.md")
    assert blocks and not any("pip install" in code for _, code in blocks)
    assert any("pip install" in code for _, code in snippets.bash_blocks(REPO / "README.md"))


@pytest.mark.slow
@pytest.mark.parametrize("doc", snippets.DOC_FILES, ids=lambda p: p.name)
def test_doc_bash_blocks_run(doc, tmp_path):
    checked = os.environ.get("GPTFORGE_DOC_SNIPPETS_CHECKED")
    if checked:
        pytest.skip(f"CI ran the doc snippets in {checked}, a venv built by README command 1 alone (.ci/run)")
    if not doc.exists():
        pytest.skip(f"{doc.name} not written yet")
    outcome = snippets.run_doc(doc, tmp_path)
    if outcome is None:
        pytest.skip(f"{doc.name} has no bash blocks")
    assert outcome.ok, outcome.report()


def test_runner_stops_background_processes_of_a_failed_file(tmp_path):
    doc = tmp_path / "server.md"
    doc.write_text("```bash\nsleep 300 &\necho $! > pid\nfalse\nkill $(cat pid)\n```\n")
    outcome = snippets.run_doc(doc, tmp_path / "work", timeout=60)
    assert not outcome.ok and outcome.seconds < 30
    pid = int((tmp_path / "work" / "scratch" / "pid").read_text())
    for _ in range(50):  # the orphan is reaped by init a moment after it is killed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"background process {pid} of the failed snippet is still running")
