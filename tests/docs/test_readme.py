"""README opens with the two set-up commands, and CI runs the second one verbatim."""

from pathlib import Path

from test_doc_snippets import bash_blocks

REPO = Path(__file__).resolve().parents[2]
DEMO = "pip install torch==2.13.0 && pip install -e . && gptforge demo"
TESTS = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def _commands(code: str) -> list[str]:
    return [line.strip() for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = bash_blocks(REPO / "README.md")
    assert [_commands(code) for _, code in blocks[:2]] == [[DEMO], [TESTS]]
    before = text[: text.index("```bash")]
    assert before.strip().startswith("# gptforge") and len(before.strip().splitlines()) <= 2  # nothing before them


def test_ci_runs_the_readme_test_command():
    assert TESTS in (REPO / ".ci" / "run").read_text(encoding="utf-8")
