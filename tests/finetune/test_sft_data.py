"""SFT data: formats, masking, EOS, packing, padding, task templates, augmentation, and bad-data errors."""

import json
import random

import pytest

from gptforge.data.augment import AugmentConfig, augment_text
from gptforge.data.sft import (IGNORE_INDEX, DataError, Example, Record, collate, detect_format, load_sft_examples,
                               pack_examples, read_records, render_segments, tokenize_segments)
from gptforge.data.templates import TaskTemplate

from finetune_helpers import write_jsonl


def trained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, m in zip(example.input_ids, example.train_mask) if m])


@pytest.mark.parametrize("record, fmt", [
    ({"text": "abc"}, "text"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"messages": []}, "chat"),
    ({"text": "a", "label": "x"}, "classification"),
    ({"source": "a", "target": "b"}, "translation"),
    ({"document": "a", "summary": "b"}, "summarization"),
    ({"context": "a", "question": "b", "answer": "c"}, "qa"),
    ({"prefix": "def f(", "completion": "x)"}, "code"),
])
def test_format_detection(record, fmt):
    assert detect_format(Record(record, "f.jsonl", 1)) == fmt


def test_prompt_is_masked_completion_and_eos_are_trained(tokenizer):
    record = Record({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, "f.jsonl", 1)
    ex = tokenize_segments(render_segments(record, "prompt_completion", tokenizer), tokenizer, max_len=64)
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, ex) == " 4<|endoftext|>"
    inputs, labels = collate([ex], pad_id=tokenizer.pad_token_id)
    # Shifted: labels[t] is token t+1; only the completion's 2 chars and EOS are targets.
    n_prompt = len(tokenizer.encode("Q: 2+2?\nA:"))
    assert (labels[0, :n_prompt - 1] == IGNORE_INDEX).all()
    assert labels[0, n_prompt - 1:].tolist() == ex.input_ids[n_prompt:]
    assert inputs[0].tolist() == ex.input_ids[:-1]


def test_chat_masks_everything_but_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"}]
    segments = render_segments(Record({"messages": messages}, "c.jsonl", 1), "chat", tokenizer)
    assert "".join(s.text for s in segments) == tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ex = tokenize_segments(segments, tokenizer, max_len=512)
    assert trained_text(tokenizer, ex) == "hello<|im_end|>\nciao<|im_end|>\n<|endoftext|>"


def test_alpaca_text_and_classification_templates(tokenizer):
    alpaca = render_segments(Record({"instruction": "Add.", "input": "2 2", "output": "4"}, "a.json", 1), "alpaca",
                             tokenizer)
    assert "### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response:\n" in alpaca[0].text and not alpaca[0].train
    assert alpaca[1].text == "4" and alpaca[1].train
    text = render_segments(Record({"text": "all of it"}, "t.jsonl", 1), "text", tokenizer)
    assert [s.train for s in text] == [True]
    sentiment = TaskTemplate("sentiment")
    seg = sentiment.segments(Record({"text": "great", "label": "positive"}, "s.csv", 2))
    assert seg[0].text == "Review: great\nSentiment:" and seg[1].text == " positive"
    translation = TaskTemplate("translation", source_lang="English", target_lang="German")
    seg = translation.segments(Record({"source": "cat", "target": "Katze"}, "t.jsonl", 1))
    assert seg[0].text == "Translate English to German.\nEnglish: cat\nGerman:" and seg[1].text == " Katze"
    qa = TaskTemplate("qa", prompt="{context} | {question} ->")
    assert qa.segments(Record({"context": "c", "question": "q", "answer": 3}, "q.jsonl", 1))[1].text == " 3"
    fim = TaskTemplate("code").segments(Record({"prefix": "def f(", "suffix": "):", "completion": "x"}, "c.jsonl", 1))
    assert fim[0].text == "<PRE> def f( <SUF>): <MID>" and fim[1].text == "x"


def test_all_file_types_read_the_same_records(tmp_path, tokenizer):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(3)))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    results = [load_sft_examples(tmp_path / f"d.{ext}", tokenizer, max_len=32) for ext in ("jsonl", "json", "csv", "parquet")]
    assert all(r == results[0] for r in results)
    assert [r.line for r in read_records(tmp_path / "d.csv")] == [2, 3, 4]


def test_packing_and_right_padding(tokenizer):
    examples = [Example([1, 2, 3], [False, True, True]), Example([4, 5], [False, True]), Example([6] * 6, [True] * 6)]
    packed = pack_examples(examples, max_len=6)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4, 5], [6] * 6]
    inputs, labels = collate(examples[:2], pad_id=0)
    assert inputs.tolist() == [[1, 2], [4, 0]]
    assert labels.tolist() == [[2, 3], [5, IGNORE_INDEX]]


def test_long_prompts_are_truncated_from_the_left(tokenizer):
    record = Record({"prompt": "x" * 100 + "END", "completion": "ok"}, "f.jsonl", 1)
    ex = tokenize_segments(render_segments(record, "prompt_completion", tokenizer), tokenizer, max_len=10)
    assert len(ex.input_ids) == 10 and tokenizer.decode(ex.input_ids) == "xxxxENDok<|endoftext|>"


@pytest.mark.parametrize("content, fmt, expected", [
    ('{"prompt": "a"}\n', "auto", r"bad\.jsonl:1: cannot tell the data format"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "prompt_completion",
     r"bad\.jsonl:2 field 'completion': missing"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 7}\n', "auto",
     r"bad\.jsonl:2 field 'completion': expected a string, got int"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": ["x"]}\n', "auto",
     r"bad\.jsonl:3 field 'completion': expected a string, got list"),
    ('{"prompt": "a", "completion": "b"}\n{oops\n', "auto", r"bad\.jsonl:2: invalid JSON"),
    ("", "auto", r"bad\.jsonl: no records \(empty file\)"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "auto", r":1 field 'messages': no assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "auto", r":1 field 'messages\[0\]\.role'"),
])
def test_bad_data_names_file_line_and_field(tmp_path, tokenizer, content, fmt, expected):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=expected):
        load_sft_examples(tmp_path / "bad.jsonl", tokenizer, fmt=fmt)


def test_label_not_in_label_list_names_file_line_and_field(tmp_path):
    (tmp_path / "labels.csv").write_text("text,label\ngood,positive\nmeh,neutral\n")
    template = TaskTemplate("sentiment")
    records = read_records(tmp_path / "labels.csv")
    template.segments(records[0])
    with pytest.raises(DataError, match=r"labels\.csv:3 field 'label': label 'neutral' is not in the label list"):
        template.segments(records[1])


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x\.txt: unsupported data file type"):
        read_records(tmp_path / "x.txt")


def test_augmentation_is_seeded_and_uses_the_synonym_table():
    config = AugmentConfig(deletion=0.2, swap=0.2, synonym=0.9, synonyms={"movie": ["film"]})
    config.validate()
    text = "this movie was a very good movie indeed"
    a = augment_text(text, config, random.Random(1))
    assert a == augment_text(text, config, random.Random(1))
    outputs = {augment_text(text, config, random.Random(s)) for s in range(20)}
    assert len(outputs) > 5 and any("film" in o for o in outputs)
    assert all(len(o.split()) <= len(text.split()) for o in outputs)
    assert augment_text(text, AugmentConfig(), random.Random(0)) == text
    with pytest.raises(ValueError, match="'deletion'"):
        AugmentConfig(deletion=1.5).validate()


def test_code_task_uses_the_models_fim_tokens_as_serving_does():
    from gptforge.fim import FIM_SPECIAL_TOKENS, fim_prompt_format, infill_prompt
    from gptforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

    tok = Tokenizer.train_bpe(["def f(x):\n    return x\n"] * 20, vocab_size=300,
                              special_tokens=[*DEFAULT_SPECIAL_TOKENS, *FIM_SPECIAL_TOKENS])
    template = TaskTemplate("code", fim_prompt=fim_prompt_format(tok))
    record = Record({"prefix": "def f(x):\n", "suffix": "\n", "completion": "    return x"}, "c.jsonl", 1)
    example = tokenize_segments(template.segments(record), tok, 64)
    prompt = infill_prompt(tok, "def f(x):\n", "\n").ids
    # The prompt the model is tuned on is the one /infill, suffix and generate(suffix=) send.
    assert example.input_ids[:len(prompt)] == prompt and not any(example.train_mask[:len(prompt)])
    assert tok.decode(example.input_ids[len(prompt):-1]) == "    return x"
    assert example.input_ids[-1] == tok.eos_token_id
    assert fim_prompt_format(Tokenizer.train_bpe(["abc"] * 5, vocab_size=270)) is None
