"""`SequenceEmitter`, the one per-sequence emitter of generate.py and the server's engine: its rules alone."""

import pytest

from gptforge.emitter import SequenceEmitter
from gptforge.tokenizer import Tokenizer

TEXT = "def add(a, b):\n    return a + b\n# héllo wörld 🙂 日本語\n" * 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe([TEXT], vocab_size=280)


def _byte_ids(tok, text):
    """Ids that spell `text` one character at a time, so a stop string spans several tokens."""
    return [i for ch in text for i in tok.encode(ch)]


def _push_all(emitter, ids):
    deltas, last = [], None
    for i in ids:
        last = emitter.push(i, logprob=-1.0)
        deltas.append(last.text)
        if emitter.done:
            break
    return deltas, last


def _single_byte_ids(tok, text):
    """One token per UTF-8 byte: '🙂' becomes four tokens, none of them text on its own."""
    by_bytes = {b: i for i, b in enumerate(tok.token_bytes()) if b is not None and len(b) == 1}
    return [by_bytes[bytes([b])] for b in text.encode("utf-8")]


def test_deltas_join_to_the_decoded_text_and_never_split_a_character(tok):
    ids = _single_byte_ids(tok, "x = '🙂 日本語'\n")
    emitter = SequenceEmitter(tok, prompt_ids=[], max_tokens=len(ids))
    deltas, last = _push_all(emitter, ids)
    assert "".join(deltas) == tok.decode(ids) == emitter.final_text()
    for delta in deltas:
        delta.encode("utf-8")  # a split character would be a lone surrogate or U+FFFD
        assert "\ufffd" not in delta
    assert last.finish_reason == "length" and emitter.tokens == ids and len(emitter.logprobs) == len(ids)
    assert deltas.count("") >= 3 + 2 * 3  # the continuation bytes of 🙂 and of each CJK character wait


def test_eos_ends_the_sequence_without_text_and_is_reported(tok):
    eos = tok.eos_token_id
    ids = tok.encode("return a")
    emitter = SequenceEmitter(tok, prompt_ids=[], max_tokens=50, stop_token_ids=[eos])
    _push_all(emitter, ids)
    end = emitter.push(eos, logprob=-0.5)
    assert end.finish_reason == "stop" and end.stop_reason == eos and end.eos_token_id == eos
    assert end.token_id is None and end.logprob == -0.5
    assert emitter.tokens == ids and emitter.sampled == len(ids) + 1  # counted, not content
    assert emitter.final_text() == tok.decode(ids)
    assert emitter.push(ids[0]).text == "" and emitter.sampled == len(ids) + 1  # done: later pushes are ignored


def test_min_tokens_turns_an_early_eos_into_content(tok):
    eos = tok.eos_token_id
    emitter = SequenceEmitter(tok, prompt_ids=[], max_tokens=5, stop_token_ids=[eos], min_tokens=2)
    assert emitter.push(eos).finish_reason is None and emitter.tokens == [eos]


def test_stop_string_across_tokens_is_cut_and_never_shown(tok):
    ids = _byte_ids(tok, "a + b\n# end")
    emitter = SequenceEmitter(tok, prompt_ids=[], max_tokens=100, stop_strings=["\n#"])
    deltas, last = _push_all(emitter, ids)
    assert "".join(deltas) == "a + b" == emitter.text
    assert last.finish_reason == "stop" and emitter.stop_reason == "\n#"
    assert not any("#" in d for d in deltas)


def test_text_held_back_for_a_possible_stop_is_released_at_the_length_limit(tok):
    ids = _byte_ids(tok, "a\n")
    emitter = SequenceEmitter(tok, prompt_ids=[], max_tokens=len(ids), stop_strings=["\n#"])
    deltas, last = _push_all(emitter, ids)
    assert deltas[-1].endswith("\n") and "".join(deltas) == "a\n"  # "\n" waited, then came out with "length"
    assert last.finish_reason == "length" and emitter.stop_reason is None


def test_finish_from_outside_flushes_and_keeps_its_reason(tok):
    emitter = SequenceEmitter(tok, prompt_ids=[], max_tokens=100, stop_strings=["STOP"])
    emitter.push(tok.encode("S")[0])
    end = emitter.finish("abort", "cancelled")
    assert end.text == "S" and end.finish_reason == "abort" and end.stop_reason == "cancelled"
    assert emitter.finish("length").finish_reason is None  # only the first end counts


def test_healed_prompt_text_is_not_shown_again(tok):
    prompt = tok.encode("def add(a, b)")
    emitter = SequenceEmitter(tok, prompt_ids=prompt[:-1], max_tokens=20, hidden_prefix=tok.decode(prompt[-1:]))
    deltas, _ = _push_all(emitter, [prompt[-1], *tok.encode(":\n")])
    assert "".join(deltas) == ":\n"


def test_stop_strings_without_a_tokenizer_are_refused():
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        SequenceEmitter(None, prompt_ids=[], max_tokens=4, stop_strings=["x"])
