"""`gptforge eval` end to end: perplexity, a JSONL task and lm-eval in one report; bad input exits 2."""

import json

import pytest

from gptforge.cli import main
from gptforge.eval.perplexity import perplexity_of_tokens, read_shard_tokens

from eval_records import MC_RECORDS, write_jsonl

TEXT = "The cat sat on the mat. The dog sat on the log. Paris is the capital of France.\n" * 6


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def test_one_run_writes_perplexity_task_and_harness_report(model_dir, tmp_path, capsys, offline):
    text = tmp_path / "val.txt"
    text.write_text(TEXT)
    data = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(
        f"task: cli_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    report_path = tmp_path / "out" / "report.json"
    report_path.parent.mkdir()
    code = main(["eval", "--model", str(model_dir), "--text", str(text), "--stride", "32",
                 "--task", str(data), "--task-type", "multiple_choice", "--shots", "1",
                 "--harness", "--tasks", "cli_mc", "--include-path", str(tasks),
                 "--output", str(report_path), "--no-progress", "--batch-size", "4"])
    assert code == 0
    report = json.loads(report_path.read_text())
    (ppl,) = report["perplexity"]
    assert ppl["perplexity"] > 1 and ppl["stride"] == 32 and ppl["max_length"] == 64
    assert ppl["num_bytes"] == len(TEXT.encode())
    assert report["task"]["metrics"].keys() == {"acc", "acc_norm"} and report["task"]["shots"] == 1
    assert 0.0 <= report["harness"]["results"]["cli_mc"]["acc"] <= 1.0
    out = capsys.readouterr().out
    assert "perplexity" in out and "lm-eval cli_mc" in out and "mc.jsonl (multiple_choice, 1-shot)" in out


def test_shards_perplexity(model_dir, model_and_tokenizer, tmp_path, capsys):
    from gptforge.data.shards import prepare_corpus

    model, tokenizer = model_and_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    prepare_corpus([str(corpus)], tmp_path / "shards", tokenizer=str(model_dir), val_fraction=0.5, progress=False)
    ids = read_shard_tokens(tmp_path / "shards", "val", max_tokens=100, tokenizer=tokenizer)
    assert len(ids) == 100
    report_path = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--shards", str(tmp_path / "shards"), "--max-tokens", "100",
                 "--output", str(report_path), "--no-progress"]) == 0
    (ppl,) = json.loads(report_path.read_text())["perplexity"]
    expected = perplexity_of_tokens(model, ids, progress=False)
    assert ppl["num_tokens"] == 99 and ppl["nll_sum"] == pytest.approx(expected.nll_sum, rel=1e-5)
    # Shards in another tokenizer's ids are refused.
    prepare_corpus([str(corpus)], tmp_path / "other", tokenizer="char", progress=False)
    assert main(["eval", "--model", str(model_dir), "--shards", str(tmp_path / "other"), "--no-progress",
                 "--output", str(report_path)]) == 2
    assert "different tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ([], "nothing to evaluate"),
    (["--task", "{data}"], "--task needs --task-type"),
    (["--harness"], "--harness needs --tasks"),
    (["--text", "{tmp}/missing.txt"], "missing.txt"),
    (["--task", "{bad}", "--task-type", "qa"], "bad.jsonl:2: missing field 'answer'"),
    (["--task", "{data}", "--task-type", "multiple_choice", "--shots", "20"], "--shots 20 needs at least 20"),
    (["--text", "{text}", "--stride", "0"], "--stride must be >= 1"),
])
def test_bad_input_exits_2_with_a_clear_message_and_no_report(model_dir, tmp_path, capsys, args, message):
    data = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    fill = {"data": str(data), "bad": str(bad), "tmp": str(tmp_path), "text": str(text)}
    report = tmp_path / "report.json"
    code = main(["eval", "--model", str(model_dir), "--output", str(report), "--no-progress"]
                + [a.format(**fill) for a in args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not report.exists()


def test_missing_model_directory(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", "--model", str(tmp_path / "no_model"), "--text", str(text)]) == 2
    assert "no_model" in capsys.readouterr().err
