"""Chat templates render as `transformers` renders them: the constructs that the Qwen3, Gemma, Phi and Llama
templates use, and (when llama.cpp's source tree is present) those families' real templates."""

import os
from pathlib import Path

import pytest

from gptforge.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, 2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}],
]
# Constructs from the families' templates: a reversed scan with a namespace and {% break %} (Qwen3),
# tojson of non-ASCII text (tool calls), strftime_now (Llama 3), template variables (enable_thinking), trim.
FEATURES = """{%- set ns = namespace(last_user=-1) %}
{%- for message in messages[::-1] %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{% break %}{%- endif %}{%- endfor %}
{{- bos_token }}[today {{ strftime_now('%Y-%m-%d') }}]{{ ns.last_user }}
{%- for message in messages %}
<{{ message['role'] }}>{{ message.content | trim }}|{{ message | tojson }}
{%- if message.role == 'assistant' and '</think>' in message.content %}[{{ message.content.split('</think>')[-1].lstrip('\\n') }}]{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<assistant>{%- if enable_thinking is defined and enable_thinking is false %}<think></think>{%- endif %}{%- endif %}"""


@pytest.fixture(scope="module")
def backend():
    return Tokenizer.train_bpe(["hello world the quick brown fox"] * 10, 300).backend


def _pair(backend, template):
    ours = Tokenizer(backend, chat_template=template, bos_token="<|endoftext|>")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                                  eos_token="<|endoftext|>")
    return ours, theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("variables", [{}, {"enable_thinking": False}])
def test_template_constructs_render_as_in_transformers(backend, conversation, generation_prompt, variables):
    ours, theirs = _pair(backend, FEATURES)
    expected = theirs.apply_chat_template(conversation, chat_template=FEATURES, tokenize=False,
                                          add_generation_prompt=generation_prompt, **variables)
    assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt, **variables) == expected
    assert "Grüße" in expected or len(conversation) == 1  # tojson keeps non-ASCII text as it is


def test_template_errors_name_the_reason(backend):
    ours, _ = _pair(backend, "{{ raise_exception('System role not supported') }}")
    with pytest.raises(TokenizerError, match="System role not supported"):
        ours.apply_chat_template(CONVERSATIONS[0])


def _templates_folder():
    bin_dir = os.environ.get("LLAMACPP_BIN")
    folder = Path(bin_dir).parent / "src" / "llama.cpp" / "models" / "templates" if bin_dir else None
    return folder if folder and folder.is_dir() else None


REAL = ["Qwen-Qwen3-0.6B.jinja", "google-gemma-2-2b-it.jinja", "microsoft-Phi-3.5-mini-instruct.jinja",
        "Qwen-Qwen2.5-7B-Instruct.jinja", "meta-llama-Llama-3.2-3B-Instruct.jinja"]


@pytest.mark.skipif(_templates_folder() is None,
                    reason="set LLAMACPP_BIN to a llama.cpp build whose ../src/llama.cpp/models/templates holds the "
                           "families' chat templates")
@pytest.mark.parametrize("name", REAL)
def test_real_family_templates_render_as_in_transformers(backend, name):
    template = (_templates_folder() / name).read_text()
    ours, theirs = _pair(backend, template)
    for conversation in CONVERSATIONS:
        if "gemma" in name and conversation[0]["role"] == "system":
            with pytest.raises(TokenizerError, match="System role not supported"):
                ours.apply_chat_template(conversation)
            continue
        for generation_prompt in (True, False):
            expected = theirs.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
            assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("marker", ["<end_of_turn>", "<|end|>", "<|im_end|>"])
def test_family_end_of_turn_markers_stop_generation(marker):
    tokenizer = Tokenizer.train_bpe(["hello world"] * 10, 300, special_tokens=["<|endoftext|>", marker])
    assert tokenizer.token_to_id(marker) in tokenizer.stop_token_ids()  # Gemma, Phi-3/4, Qwen turns end here
