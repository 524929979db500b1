"""The docstring task: extraction with `ast`, no answer leaking into the prompt, split by package, baseline,
and the recipe in configs/ loads."""

import json
import textwrap
from pathlib import Path

import pytest

from gptforge.data.sft import Record, read_records
from gptforge.finetune.docstrings import (PROMPT_SUFFIX, extract_functions, split_of, stdlib_root,
                                          write_docstring_dataset)
from gptforge.finetune.evaluate import baseline_prediction
from gptforge.finetune.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]

SOURCE = textwrap.dedent('''
    def parse_args(argv, strict=False):
        """Parse command line arguments into a namespace.

        Longer description that must not be used.
        """
        return argv


    def undocumented(x):
        return x


    def only_doc():
        """Has nothing but a docstring, so there is no code to summarize."""


    class Reader:
        async def read_line(self):
            """Read one line from the stream."""
            data = await self.stream.read()
            return data
''')


def test_extracts_summary_and_strips_the_docstring_from_the_code():
    records = extract_functions(SOURCE, "pkg.mod")
    assert [r["qualname"] for r in records] == ["parse_args", "Reader.read_line"]
    first = records[0]
    assert first["completion"] == " Parse command line arguments into a namespace."
    assert first["prompt"] == "def parse_args(argv, strict=False):\n    return argv" + PROMPT_SUFFIX
    assert "Longer description" not in first["prompt"] and '"""' not in first["prompt"]
    assert records[1]["prompt"].startswith("async def read_line(self):\n    data = await")
    assert baseline_prediction(Record(first, "x", 1), "name") == "parse args"


def test_dataset_is_split_by_top_level_package(tmp_path):
    root = tmp_path / "lib"
    for package in [f"pkg{i}" for i in range(12)]:
        for module in ("a", "b"):
            path = root / package / f"{module}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(SOURCE)
    (root / "pkg0" / "tests").mkdir()
    (root / "pkg0" / "tests" / "c.py").write_text(SOURCE)  # test folders are skipped
    counts = write_docstring_dataset(tmp_path / "out", root)
    assert sum(counts.values()) == 12 * 2 * 2
    packages = {}
    for split in ("train", "val", "test"):
        for record in read_records(tmp_path / "out" / f"{split}.jsonl"):
            packages.setdefault(record.data["module"].split(".")[0], set()).add(split)
            assert ".tests." not in record.data["module"]
    assert all(len(splits) == 1 for splits in packages.values())
    assert {split_of(p) for p in packages} >= {"train"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["records"] == counts


def test_real_stdlib_package_gives_pairs():
    source = (stdlib_root() / "json" / "decoder.py").read_text(encoding="utf-8")
    records = extract_functions(source, "json.decoder")
    assert len(records) >= 3
    assert all(r["prompt"].endswith(PROMPT_SUFFIX) and r["completion"].startswith(" ") for r in records)


def test_docstring_recipe_in_configs_loads():
    recipe = load_recipe(REPO / "configs" / "finetune-docstrings.yaml",
                         ["--train.max_steps=5", "--train.lr=1e-4", "--tasks.0.max_new_tokens=7"])
    task = recipe.tasks[0]
    assert task.metric == "rougeL" and task.baseline == "name" and task.test_data
    assert recipe.train.max_steps == 5 and recipe.train.lr == 1e-4  # YAML reads 1e-4 as a string
    assert task.max_new_tokens == 7
    with pytest.raises(ValueError, match=r"no tasks\[3\]"):
        load_recipe(REPO / "configs" / "finetune-docstrings.yaml", ["--tasks.3.weight=2"])
    with pytest.raises(ValueError, match="packing"):
        load_recipe(REPO / "configs" / "finetune-docstrings.yaml", ["--head=classification", "--data.packing=true",
                                                                    "--tasks.0.format=classification"])
    lora = load_recipe(REPO / "configs" / "finetune-lora.yaml", data_files=["x.jsonl"])
    assert lora.method == "lora" and lora.tasks[0].data == "x.jsonl"
    with pytest.raises(ValueError, match=r"has 1 task\(s\)"):
        load_recipe(REPO / "configs" / "finetune-docstrings.yaml", data_files=["a.jsonl", "b.jsonl"])
