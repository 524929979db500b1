"""The lm-eval adapter, offline: custom task YAMLs over local JSONL files (--include-path)."""

import pytest
import torch

from gptforge.eval.perplexity import perplexity_of_text
from gptforge.eval.tasks import evaluate_task

from eval_records import MC_RECORDS, write_jsonl

pytest.importorskip("lm_eval")

MC_YAML = """\
task: gptforge_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _task_dir(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    return data, tasks


def test_lm_eval_accuracy_equals_our_multiple_choice_accuracy(model_and_tokenizer, tmp_path):
    from gptforge.eval.harness import run_harness

    model, tokenizer = model_and_tokenizer
    data, tasks = _task_dir(tmp_path)
    report = run_harness(model, ["gptforge_tiny_mc"], tokenizer=tokenizer, include_path=tasks, batch_size=4)
    ours = evaluate_task(model, tokenizer, data, "multiple_choice", progress=False)
    theirs = report["results"]["gptforge_tiny_mc"]
    assert report["n_samples"]["gptforge_tiny_mc"] == len(MC_RECORDS)
    assert theirs["acc"] == pytest.approx(ours.metrics["acc"])
    assert theirs["acc_norm"] == pytest.approx(ours.metrics["acc_norm"])


def test_loglikelihood_rolling_equals_perplexity_with_stride_equal_to_context(model_and_tokenizer):
    from lm_eval.api.instance import Instance

    from gptforge.eval.harness import GPTForgeLM

    model, tokenizer = model_and_tokenizer
    text = " ".join(["The cat sat on the mat. Paris is the capital of France."] * 8)
    lm = GPTForgeLM(model=model, tokenizer=tokenizer, batch_size=3, max_length=16)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (total,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    ours = perplexity_of_text(model, tokenizer, text, max_length=16, stride=16, progress=False)
    assert len(tokenizer.encode(text)) > 3 * 16  # several windows
    assert -total == pytest.approx(ours.nll_sum, rel=1e-5)


def test_registered_by_name_and_loads_a_directory(model_dir):
    from lm_eval.api.registry import get_model

    import gptforge.eval.harness  # noqa: F401  (registers the class)

    lm = get_model("gptforge").create_from_arg_string(f"pretrained={model_dir},batch_size=2", {"device": "cpu"})
    assert lm.batch_size_per_gpu == 2 and lm.max_length == 64
    if not torch.cuda.is_available():
        # lm-eval's command line asks for cuda by default; without CUDA the CPU is used, like its HF backend.
        lm = get_model("gptforge").create_from_arg_string(f"pretrained={model_dir}", {"device": "cuda"})
        assert next(lm.model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="pretrained=DIR"):
        get_model("gptforge")()


@pytest.mark.slow  # an unknown name makes lm-eval index all its built-in tasks (~10 s)
def test_unknown_task_and_missing_include_path(model_and_tokenizer, tmp_path):
    from gptforge.eval.harness import run_harness

    model, tokenizer = model_and_tokenizer
    with pytest.raises(FileNotFoundError, match="--include-path"):
        run_harness(model, ["x"], tokenizer=tokenizer, include_path=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_harness(model, ["gptforge_no_such_task"], tokenizer=tokenizer, include_path=tmp_path)


def test_generate_until_is_greedy_generation_cut_at_until(model_and_tokenizer):
    generate = pytest.importorskip("gptforge.generate")
    from lm_eval.api.instance import Instance

    from gptforge.eval.harness import GPTForgeLM

    model, tokenizer = model_and_tokenizer
    lm = GPTForgeLM(model=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["The cat sat on the", "Paris is the capital of", "Two plus two is"]
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(p, {"until": ["."], "max_gen_toks": 8, "do_sample": False})) for p in prompts]
    answers = lm.generate_until(requests, disable_tqdm=True)
    expected = generate.generate(model, prompts, tokenizer=tokenizer, max_new_tokens=8, do_sample=False)
    assert answers == [e.text.split(".")[0] for e in expected]
