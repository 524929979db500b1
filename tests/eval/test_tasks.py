"""JSONL task evaluation: choice scoring against transformers, few-shot draws, generation metrics, bad input."""

import pytest
import torch

from gptforge.eval import metrics
from gptforge.eval.scoring import encode_pair, score_continuations
from gptforge.eval.tasks import TaskDataError, evaluate_task, fewshot_prompts, load_task

from eval_records import MC_RECORDS, write_jsonl

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()


def _hf_logprob(hf_model, context, continuation, max_length=None):
    ids = (context + continuation)
    if max_length is not None:
        ids = ids[-(max_length + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    n = len(continuation)
    return sum(logprobs[len(ids) - 1 - n + i, tok].item() for i, tok in enumerate(continuation))


def test_multiple_choice_accuracy_equals_argmax_of_hf_loglikelihoods(model_and_tokenizer, hf_model, tmp_path):
    model, tokenizer = model_and_tokenizer
    path = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    hf_predicted, hf_norm = [], []
    for record in MC_RECORDS:
        lls = [_hf_logprob(hf_model, *encode_pair(tokenizer, record["prompt"], " " + c)) for c in record["choices"]]
        hf_predicted.append(max(range(len(lls)), key=lls.__getitem__))
        normed = [ll / len(c) for ll, c in zip(lls, record["choices"])]
        hf_norm.append(max(range(len(normed)), key=normed.__getitem__))
    answers = [r["answer"] for r in MC_RECORDS]
    result = evaluate_task(model, tokenizer, path, "multiple_choice", batch_size=3, progress=False)
    assert result.metrics["acc"] == pytest.approx(metrics.accuracy(hf_predicted, answers))
    assert result.metrics["acc_norm"] == pytest.approx(metrics.accuracy(hf_norm, answers))
    assert result.predictions == [r["choices"][i] for r, i in zip(MC_RECORDS, hf_predicted)]


def test_scores_independent_of_batching_and_truncated_from_the_left(model_and_tokenizer, hf_model):
    model, tokenizer = model_and_tokenizer
    pairs = [encode_pair(tokenizer, r["prompt"], " " + r["choices"][0]) for r in MC_RECORDS]
    one = score_continuations(model, pairs, batch_size=1)
    many = score_continuations(model, pairs, batch_size=7)
    assert [s.logprob for s in one] == pytest.approx([s.logprob for s in many], abs=1e-4)
    short = score_continuations(model, pairs, batch_size=4, max_length=6)
    for pair, score in zip(pairs, short):
        assert score.logprob == pytest.approx(_hf_logprob(hf_model, *pair, max_length=6), abs=1e-4)
    # The greedy flag: a continuation made of each position's argmax is greedy, another one is not.
    context = tokenizer.encode("The cat sat on the")
    with torch.no_grad():
        best = int(model(torch.tensor([context]))[0, -1].argmax())
        worst = int(model(torch.tensor([context]))[0, -1].argmin())
    flags = score_continuations(model, [(context, [best]), (context, [worst])])
    assert [f.is_greedy for f in flags] == [True, False]


def test_scores_agree_with_generate_score_tokens(model_and_tokenizer):
    generate = pytest.importorskip("gptforge.generate")
    model, tokenizer = model_and_tokenizer
    pairs = [encode_pair(tokenizer, r["prompt"], " " + r["choices"][-1]) for r in MC_RECORDS]
    per_token = generate.score_tokens(model, [c + x for c, x in pairs])
    ours = score_continuations(model, pairs, batch_size=4)
    for (context, continuation), row, score in zip(pairs, per_token, ours):
        assert score.logprob == pytest.approx(sum(row[len(context):]), abs=1e-4)


def test_classification_labels_from_data_or_list(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    records = [{"text": "The cat sat on the mat.", "label": "animal"}, {"text": "Two plus two is four.", "label": "math"},
               {"text": "The dog sat on the log.", "label": "animal"}, {"text": "One plus one is two.", "label": "math"}]
    path = write_jsonl(tmp_path / "cls.jsonl", records)
    examples = load_task(path, "classification")
    assert examples[0].choices == ["animal", "math"] and [e.answer for e in examples] == [0, 1, 0, 1]
    assert examples[0].prompt == "The cat sat on the mat.\nLabel:"
    as_mc = write_jsonl(tmp_path / "as_mc.jsonl", [
        {"prompt": r["text"] + "\nLabel:", "choices": ["animal", "math"], "answer": r["label"]} for r in records])
    cls = evaluate_task(model, tokenizer, path, "classification", progress=False)
    mc = evaluate_task(model, tokenizer, as_mc, "multiple_choice", progress=False)
    assert cls.metrics == mc.metrics
    with pytest.raises(TaskDataError, match=r"cls.jsonl:1: field 'label' is 'animal', not one of the labels"):
        load_task(path, "classification", labels=["math", "other"])


def test_fewshot_draws_are_deterministic_and_exclude_the_query(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    examples = load_task(path, "multiple_choice")
    first = fewshot_prompts(examples, 3, seed=7)
    assert first == fewshot_prompts(examples, 3, seed=7)
    assert first != fewshot_prompts(examples, 3, seed=8)
    for example, prompt in zip(examples, first):
        blocks = prompt.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == example.prompt
        assert all(b != example.prompt + " " + example.target for b in blocks[:-1])
        assert all(b.rsplit(" ", 1)[0] in {e.prompt for e in examples} for b in blocks[:-1])
    pool = load_task(write_jsonl(tmp_path / "pool.jsonl", MC_RECORDS[:2]), "multiple_choice")
    assert fewshot_prompts(examples, 2, pool=pool)[0].startswith(
        tuple(p.prompt + " " + p.target for p in pool))
    with pytest.raises(ValueError, match="--shots 3 needs at least 3"):
        fewshot_prompts(examples, 3, pool=pool)


def test_shots_and_limit_are_reported(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    path = write_jsonl(tmp_path / "mc.jsonl", MC_RECORDS)
    zero = evaluate_task(model, tokenizer, path, "multiple_choice", limit=4, progress=False)
    two = evaluate_task(model, tokenizer, path, "multiple_choice", shots=2, limit=4, progress=False)
    assert zero.num_examples == two.num_examples == 4 and two.shots == 2


def test_generation_metrics_on_the_models_own_greedy_output(model_and_tokenizer, tmp_path):
    generate = pytest.importorskip("gptforge.generate")
    model, tokenizer = model_and_tokenizer
    questions = ["what colour is the sky?", "what is the capital of France?"]
    prompts = [f"Question: {q}\nAnswer:" for q in questions]
    outputs = generate.generate(model, prompts, tokenizer=tokenizer, max_new_tokens=6, do_sample=False, stop=["\n\n"])
    own = [o.text.strip() for o in outputs]
    assert all(own)
    same = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": [a, "unrelated"]}
                                                for q, a in zip(questions, own)])
    result = evaluate_task(model, tokenizer, same, "qa", max_new_tokens=6, progress=False)
    assert [p.strip() for p in result.predictions] == own
    assert result.metrics == {"exact_match": 1.0, "f1": 1.0}
    other = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "reference": "zzzz qqqq"} for p in prompts])
    result = evaluate_task(model, tokenizer, other, "generation", max_new_tokens=6, progress=False,
                           metric_names=["exact_match", "rougeL", "chrf"])
    assert result.metrics["exact_match"] == 0.0 and result.metrics["rougeL"] == 0.0


@pytest.mark.parametrize("lines, task_type, message", [
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', '{"prompt": "b", "choices": '],
     "multiple_choice", r"bad.jsonl:2: invalid JSON"),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', '', '{"prompt": "b", "answer": 1}'],
     "multiple_choice", r"bad.jsonl:3: missing field 'choices'"),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 2}'], "multiple_choice",
     r"bad.jsonl:1: field 'answer' is 2, outside 0..1"),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": "z"}'], "multiple_choice",
     r"bad.jsonl:1: field 'answer' is 'z', not one of the choices"),
    (['[1, 2]'], "qa", r"bad.jsonl:1: expected a JSON object"),
    (['{"question": "q"}'], "qa", r"bad.jsonl:1: missing field 'answer'"),
    (['{"source": "s", "target": 3}'], "translation", r"bad.jsonl:1: field 'target' must be a string"),
    (['{"summary": "s"}'], "summarization", r"bad.jsonl:1: missing field 'document'"),
    (['{"text": "t"}'], "classification", r"bad.jsonl:1: missing field 'label'"),
    ([], "qa", r"bad.jsonl: the file has no examples"),
])
def test_bad_task_files_name_file_line_and_field(tmp_path, lines, task_type, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskDataError, match=message):
        load_task(path, task_type)


def test_template_fields_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"source": "un deux", "target": "one two", "lang": "French"}])
    (example,) = load_task(path, "translation", template="{lang}: {source}\nEnglish:")
    assert example.prompt == "French: un deux\nEnglish:" and example.references == ["one two"]
    with pytest.raises(TaskDataError, match=r"t.jsonl:1: missing field 'language' \(used by the prompt template\)"):
        load_task(path, "translation", template="{language}: {source}")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task(tmp_path / "nope.jsonl", "qa")
