"""Tokenizer: byte-level BPE round trips any Unicode, char-level, files, chat templates, HF compatibility."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge import Tokenizer
from gptforge.tokenizer import TokenizerError

CORPUS = ["def add(a, b):\n    return a + b\n", "Hello, wörld! Ünïcödé ✓ 你好 🙂\n", "the quick brown fox " * 20]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS * 5, vocab_size=300)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_arbitrary_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_merges_and_special_tokens(bpe):
    assert bpe.vocab_size > 256 + 4
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")
    assert bpe.eos_token == "<|endoftext|>" and bpe.eos_token_id is not None
    assert bpe.encode("<|im_end|>") == [bpe.token_to_id("<|im_end|>")]


def test_char_tokenizer_is_nanogpt_style():
    tok = Tokenizer.train_char(["hello world\n"])
    assert tok.vocab_size == len(set("hello world\n"))
    ids = tok.encode("hello")
    assert ids == [sorted(set("hello world\n")).index(c) for c in "hello"]
    assert tok.decode(tok.encode("world\nhello ")) == "world\nhello "


def test_save_load_round_trip_and_hf_fast_tokenizer(bpe, tmp_path):
    bpe = Tokenizer(bpe.backend, chat_template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    bpe.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    text = "def f():\n    return 'ü'\n"
    assert again.encode(text) == bpe.encode(text)
    assert again.chat_template == bpe.chat_template
    assert again.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "[user]hi"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(text) == bpe.encode(text)
    assert hf.eos_token == bpe.eos_token


def test_chatml_default_template(bpe):
    text = bpe.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = bpe.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == bpe.token_to_id("<|im_start|>")
    assert bpe.token_to_id("<|im_end|>") in bpe.stop_token_ids()


def test_reads_hf_style_token_dicts_and_named_templates(bpe, tmp_path):
    bpe.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>", "special": True}
    cfg["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.eos_token == "<|im_end|>"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(TokenizerError, match="messages\\[0\\]"):
        Tokenizer.train_char(["ab"]).apply_chat_template([{"content": "no role"}])


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'later'",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
]
# Written in the style of the templates Qwen 2.5 and Llama 3.1 ship (tools as JSON via `tojson`, calls read
# from `tool_calls[].function`, results as "tool" / "ipython" turns); not copies of them.
QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{%- elif m.tool_calls %}<|im_start|>assistant\n{%- for c in m.tool_calls %}"
    "{%- set c = c.function if c.function is defined else c %}\n<tool_call>\n{\"name\": \"{{ c.name }}\", "
    "\"arguments\": {{ c.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
LLAMA_STYLE = (
    "{{- bos_token }}{%- for m in messages %}{%- if m.role == 'user' and loop.first and tools %}"
    "<|start_header_id|>user<|end_header_id|>\n\n{%- for t in tools %}{{ t | tojson(indent=4) }}\n\n{% endfor %}"
    "{{ m.content }}<|eot_id|>{%- elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- set c = m.tool_calls[0].function %}{\"name\": \"{{ c.name }}\", \"parameters\": {{ c.arguments | tojson }}}"
    "<|eot_id|>{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}")


@pytest.mark.parametrize("template,call", [
    (None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (QWEN_STYLE, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (LLAMA_STYLE, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
])
def test_templates_render_tools_calls_and_results(bpe, template, call):
    tok = Tokenizer(bpe.backend, chat_template=template)
    text = tok.apply_chat_template(CALL_MESSAGES, tools=TOOLS)
    assert call in text and "21 C" in text
    assert "Weather <now> & 'later'" in text  # tojson as Hugging Face defines it: no HTML escaping
    assert json.dumps(TOOLS[0]) in text or json.dumps(TOOLS[0], indent=4) in text
    plain = tok.apply_chat_template(CALL_MESSAGES[:1])
    assert "get_weather" not in plain  # no tools given: no tools section


def test_chatml_tool_results_share_one_user_turn(bpe):
    two = CALL_MESSAGES[:2] + [{"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]
    text = bpe.apply_chat_template(two, tools=TOOLS, add_generation_prompt=False)
    assert text.endswith("<|im_start|>user\n<tool_response>\na\n</tool_response>\n<tool_response>\nb\n"
                         "</tool_response><|im_end|>\n")
    assert text.startswith("<|im_start|>system\n# Tools") and text.count("<|im_start|>system") == 1
