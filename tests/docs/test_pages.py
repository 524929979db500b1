"""README opens with the two set-up commands (and CI runs the second); the architecture page names real modules."""

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


def test_ci_runs_the_readme_commands_and_the_snippets_in_a_venv_of_command_1():
    """.ci/run runs README command 1 as written in a fresh venv, every doc snippet there, then command 2."""
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = DEMO.split(" && gptforge demo")[0]
    assert TESTS in ci and DEMO in ci
    order = [ci.index("python -m venv"), ci.index("/bin/activate"), ci.index(DEMO),
             ci.index("tools/run_doc_snippets.py --venv"), ci.index(TESTS)]
    assert order == sorted(order), "README command 1, then the snippets, in a fresh venv; command 2 after"
    assert ci.index(install) == ci.index(DEMO)


def test_architecture_page_names_real_modules():
    import re

    package = REPO / "src" / "gptforge"
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    files = set(re.findall(r"\b((?:[a-z_]+/)?[a-z_]+\.py)\b", text))
    folders = set(re.findall(r"\+-- ([a-z_]+)/", text))
    assert len(files) > 15 and len(folders) > 5
    missing = [f for f in files if not list(package.rglob(f.split("/")[-1]))
               or ("/" in f and not (package / f).exists() and not (package / "commands" / f).exists())]
    missing += [d for d in folders if not (package / d).is_dir()]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
