"""The config scheme: every field checked against its annotation, suggestions for unknown names, YAML errors
with a line, and command-line overrides named as such, in every scheme (pretrain, finetune, moderation)."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from gptforge.cli import main
from gptforge.config import (Config, ConfigError, ConfigSource, apply_overrides, dataclass_from_dict, describe_type,
                             load_yaml)


@dataclass
class Example:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    limit: Optional[int] = None
    mode: Literal["fast", "slow"] = "fast"
    items: list[str] = field(default_factory=list)
    table: dict[str, list[str]] = field(default_factory=dict)


@pytest.mark.parametrize("data, message", [
    ({"count": "five"}, "x.yaml: sec.count must be an integer, got 'five'"),
    ({"count": 2.5}, "sec.count must be an integer, got 2.5"),
    ({"count": True}, "sec.count must be an integer, got True"),
    ({"rate": "fast"}, "x.yaml: sec.rate must be a number, got 'fast'"),
    ({"rate": [1]}, "sec.rate must be a number, got [1]"),
    ({"flag": "yes"}, "sec.flag must be true or false, got 'yes'"),
    ({"flag": 1}, "sec.flag must be true or false, got 1"),
    ({"name": ["a"]}, "sec.name must be a string, got ['a']"),
    ({"limit": "ten"}, "sec.limit must be an integer (or null), got 'ten'"),
    ({"mode": "medium"}, "sec.mode must be one of 'fast', 'slow', got 'medium'"),
    ({"items": "a"}, "sec.items must be a list of strings, got 'a'"),
    ({"items": [["a"]]}, "sec.items must be a list of strings, got [['a']]"),
    ({"table": {"a": "b"}}, "sec.table must be a mapping of strings to a list of strings, got {'a': 'b'}"),
    ({"cuont": 3}, "x.yaml: unknown field sec.cuont; did you mean count?"),
    ({"zzz": 3}, "unknown field sec.zzz; known fields: count, flag, items, limit, mode, name, rate, table"),
])
def test_each_annotation_kind_is_checked(data, message):
    with pytest.raises(ConfigError) as info:
        dataclass_from_dict(Example, data, "x.yaml", "sec.")
    assert str(info.value) == message if message.startswith("x.yaml") else message in str(info.value)


def test_values_are_converted_where_unambiguous():
    built = dataclass_from_dict(Example, {"count": 1e3, "rate": 3, "name": 2024, "limit": None,
                                          "items": ["a"], "table": {"k": ["v"]}}, "x.yaml")
    assert built.count == 1000 and isinstance(built.count, int)
    assert built.rate == 3.0 and isinstance(built.rate, float)
    assert built.name == "2024"
    assert dataclass_from_dict(Example, {"rate": "1e-4"}, "x.yaml").rate == pytest.approx(1e-4)  # YAML 1.1 string


def test_describe_type_in_words():
    assert describe_type(int) == "an integer"
    assert describe_type(Optional[float]) == "a number (or null)"
    assert describe_type(Literal["a", "b"]) == "one of 'a', 'b'"
    assert describe_type(list[str]) == "a list of strings"


def test_model_config_fields_are_checked_with_suggestions():
    with pytest.raises(ConfigError, match=r"^r.yaml: unknown field model.n_layers; did you mean n_layer\?$"):
        Config.from_dict({"n_layers": 2}, "r.yaml", "model.")
    with pytest.raises(ConfigError, match=r"^r.yaml: model.n_head must be an integer, got 'four'$"):
        Config.from_dict({"n_head": "four"}, "r.yaml", "model.")
    with pytest.raises(ConfigError, match=r"^r.yaml: model: config field 'n_embd' \(30\) must be divisible"):
        Config.from_dict({"n_embd": 30, "n_head": 4}, "r.yaml", "model.")


def test_overrides_are_named_as_the_command_line():
    source = ConfigSource("r.yaml")
    data = apply_overrides({"train": {"lr": 0.1}}, ["--train.lr=fast", "--extra.key=1"], source)
    assert data == {"train": {"lr": "fast"}, "extra": {"key": 1}}
    assert source.of("train.lr") == "command line (--train.lr=fast)"
    assert source.of("train.max_steps") == "r.yaml"
    assert source.of("extra") == "command line (--extra.key=1)"  # the section only the command line made
    with pytest.raises(ConfigError, match=r"command line \(--train.lr.x=1\): train.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["--train.lr.x=1"])


@pytest.mark.parametrize("text, where", [
    ("model: {n_layer: 2\ntrain: [\n", "line 2, column 6: not valid YAML: expected ',' or '}'"),
    ("a: 1\n  b: 2\n", "line 2, column 4: not valid YAML: mapping values are not allowed here"),
    ("a: 'unclosed\n", "not valid YAML: found unexpected end of stream"),
])
def test_yaml_syntax_errors_name_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(info.value).startswith(f"{path}, line ") and where in str(info.value)
    assert "<unicode string>" not in str(info.value)


def test_missing_file_says_what_kind_of_file():
    with pytest.raises(ConfigError, match="^config file not found: nowhere.yaml$"):
        load_yaml("nowhere.yaml")
    with pytest.raises(ConfigError, match="^moderation policy file not found: nowhere.yaml$"):
        load_yaml("nowhere.yaml", kind="moderation policy file")


# ---- the schemes end to end, through the CLI: one line on stderr, exit status 2, no traceback ----------

def _recipe(tmp_path, **train):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
                                    "data": {"sources": [str(tmp_path / "t.txt")], "tokenizer": "char"},
                                    "train": {"max_steps": 2, **train}, "out_dir": str(tmp_path / "run")}))
    return path


@pytest.mark.parametrize("train, overrides, message", [
    ({"max_steps": "five"}, [], "{path}: train.max_steps must be an integer, got 'five'"),
    ({}, ["--train.lr=fast"], "command line (--train.lr=fast): train.lr must be a number, got 'fast'"),
    ({}, ["--model.n_layers=2"], "command line (--model.n_layers=2): unknown field model.n_layers; "
                                 "did you mean n_layer?"),
    ({}, ["--trian.lr=1"], "command line (--trian.lr=1): unknown field trian; did you mean train?"),
    ({}, ["--data.split=head"], "command line (--data.split=head): data.split must be one of 'tail', 'documents', "
                                "got 'head'"),
    ({"compile": "no"}, [], "{path}: train.compile must be true or false, got 'no'"),
])
def test_pretrain_recipe_mistakes_get_one_line(tmp_path, capsys, train, overrides, message):
    path = _recipe(tmp_path, **train)
    assert main(["pretrain", "--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gptforge pretrain: error: {message.format(path=path)}"
    assert not (tmp_path / "run").exists()


def test_finetune_recipe_mistakes_get_one_line(tmp_path, capsys):
    path = tmp_path / "ft.yaml"
    path.write_text("model: base\ntasks: [{data: d.jsonl, max_new_tokens: many}]\ntrain: {max_steps: 2}\n")
    assert main(["finetune", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"gptforge finetune: error: {path}: tasks[0].max_new_tokens must be "
                                               "an integer, got 'many'")
    path.write_text("model: base\ntasks: [{data: d.jsonl}]\nloar: {r: 4}\n")
    assert main(["finetune", "--config", str(path)]) == 2
    assert "unknown field loar; did you mean lora?" in capsys.readouterr().err
    path.write_text("model: base\ntasks: [{data: d.jsonl}]\n")
    assert main(["finetune", "--config", str(path), "--lora.r=big", "--method=lora"]) == 2
    assert "command line (--lora.r=big): lora.r must be an integer, got 'big'" in capsys.readouterr().err
    assert main(["finetune", "--config", str(path), "--tasks.0.weight=heavy"]) == 2
    assert "command line (--tasks.0.weight=heavy): tasks[0].weight must be a number" in capsys.readouterr().err


def test_moderation_policy_mistakes_get_one_line(tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("blocked_terms: [a]\ncase_sensitive: sometimes\n")
    model = tmp_path / "model"  # never loaded: the policy is checked first
    assert main(["generate", "--model", str(model), "--prompt", "x", "--moderation", str(policy)]) == 2
    assert capsys.readouterr().err.strip() == (f"gptforge generate: error: {policy}: case_sensitive must be "
                                               "true or false, got 'sometimes'")
    assert main(["generate", "--model", str(model), "--prompt", "x", "--moderation", "policy.yaml"]) == 2
    assert "moderation policy file not found: policy.yaml" in capsys.readouterr().err
