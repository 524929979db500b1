"""The curated `stdlib` corpus: the data-line rule, named exclusions, duplicates, the max_bytes sample, reports."""

import json

import pytest

from gptforge.cli import main
from gptforge.data import corpus as C
from gptforge.data.shards import prepare_corpus

CODEC_TABLE = "".join(f"    0x{i:04x}: 0x{(i * 7) % 256:04x},  # LATIN LETTER {i}\n" for i in range(40))
CODE = '''import os


def size_of(path):
    """Bytes in the file at path."""
    return os.stat(path).st_size


class Walker:
    def __init__(self, root):
        self.root = root
'''


@pytest.mark.parametrize("line, is_data", [
    ("    0x0080: 0x00c7,  # LATIN CAPITAL LETTER C WITH CEDILLA", True),
    ("    '\\x00'     #  0x00 -> NULL", True),
    ("    'AElig': 0xc6,", True),
    ("    (1, -2.5, 3e-4),", True),
    ("    'copy_reg': 'copyreg',", True),
    ("    )", False),  # punctuation alone is code layout, not data
    ("x = 1", False),
    ("    return 0", False),
    ('    """Docstring opener', False),
    ('"""', False),
    ("    foo('a', 1)", False),
    ("", False),
])
def test_data_line_rule(line, is_data):
    assert C.is_data_line(line) is is_data


def test_machine_generated_rule():
    assert C.machine_generated_rule("decoding_table = {\n" + CODEC_TABLE + "}\n") == "literal_data"
    assert C.machine_generated_rule(CODE) is None
    assert C.machine_generated_rule(CODE + "BLOB = '" + "A" * (C.LONG_LINE_CHARS + 1) + "'\n") == "long_lines"
    # Half data is not over the threshold: a module with a modest table stays.
    half = "\n".join(["x = f(1)", "'a',"] * 10)
    assert C.data_line_share(half) == 0.5 and C.machine_generated_rule(half) is None


@pytest.fixture
def library(tmp_path):
    """A small fake standard library: 26 code modules, a codec table, a named file, a duplicate, an empty file."""
    root = tmp_path / "lib"
    for letter in "abcdefghijklmnopqrstuvwxyz":
        (root / f"{letter}mod.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{letter}mod.py").write_text(CODE.replace("Walker", f"Walker{letter.upper()}"))
    (root / "encodings").mkdir()
    (root / "encodings" / "cp999.py").write_text("decoding_table = (\n" + CODEC_TABLE + ")\n")
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text(CODE + "# looks like code, but it is on the named list\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "copy.py").write_text(CODE.replace("Walker", "WalkerA"))  # same bytes as amod.py
    (root / "pkg" / "__init__.py").write_text("")
    return root


def test_curation_rules_and_counts(library):
    files, sel = C.curate_stdlib(root=library, files=sorted(library.rglob("*.py")))
    kept = [p.relative_to(library).as_posix() for p in files]
    assert kept == sorted(kept) and len(kept) == 26 and "amod.py" in kept and "pkg/copy.py" not in kept
    assert {rule: e["files"] for rule, e in sel.dropped.items()} == {
        "named": 1, "literal_data": 1, "duplicate": 1, "empty": 1}
    assert sel.dropped["duplicate"]["examples"] == ["pkg/copy.py"]
    assert sel.files_in == sel.kept_files + sum(e["files"] for e in sel.dropped.values()) == 30
    assert sel.bytes_in == sel.kept_bytes + sum(e["bytes"] for e in sel.dropped.values())
    assert "kept 26 of 30 files" in sel.summary() and "literal tables" in sel.summary()


def test_max_bytes_samples_across_the_library_not_its_head(library):
    everything = sorted(library.rglob("*.py"))
    size = len(CODE.replace("Walker", "WalkerA").encode())
    files, sel = C.curate_stdlib(max_bytes=10 * size + 5, root=library, files=everything)
    names = [p.name for p in files]
    assert len(names) == 10 and names == sorted(names)
    assert names != [f"{c}mod.py" for c in "abcdefghij"]  # not the alphabetical head
    assert any(n[0] > "m" for n in names) and any(n[0] < "m" for n in names)
    assert sel.kept_bytes <= 10 * size + 5 and sel.dropped["max_bytes"]["files"] == 16
    again, _ = C.curate_stdlib(max_bytes=10 * size + 5, root=library, files=list(reversed(everything)))
    assert again == files  # deterministic, whatever order the files were listed in


def test_the_real_standard_library():
    files, sel = C.curate_stdlib()
    kept = {p.relative_to(C.stdlib_root()).as_posix() for p in files}
    assert {"os.py", "json/__init__.py", "typing.py", "functools.py"} <= kept
    assert not {"encodings/cp437.py", "encodings/cp1252.py", "encodings/mac_roman.py"} & kept  # charmap tables
    assert not any(k.startswith("pydoc_data/") for k in kept)
    assert "html/entities.py" not in kept and "encodings/__init__.py" in kept  # the package code stays
    sampled, sampled_sel = C.curate_stdlib(max_bytes=2_000_000)
    names = [p.relative_to(C.stdlib_root()).as_posix() for p in sampled]
    assert sampled_sel.kept_bytes <= 2_000_000 < sampled_sel.kept_bytes + 200_000
    assert sum(1 for n in names if n[0] >= "m") > len(names) / 4  # modules from m to z are in


def test_prepare_reports_what_went_in_and_out(tmp_path, capsys):
    corpus = prepare_corpus(["stdlib"], tmp_path / "a", tokenizer="char", max_bytes=150_000, progress=False)
    (selection,) = corpus.manifest["selection"]
    assert selection["source"] == "stdlib" and selection["kept_bytes"] <= 150_000
    assert {"named", "literal_data", "max_bytes"} <= set(selection["dropped"])
    assert corpus.manifest["documents"] == selection["kept_files"]
    assert main(["prepare", "stdlib", "--out", str(tmp_path / "b"), "--tokenizer", "char", "--max-bytes", "150000",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out  # for people: sentences, what the curation kept and why it left files out
    assert "stdlib: kept" in printed and "literal tables" in printed and "Prepared" in printed
    assert main(["prepare", "stdlib", "--out", str(tmp_path / "b"), "--tokenizer", "char", "--max-bytes", "150000",
                 "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selection"][0]["kept_files"] == selection["kept_files"]
