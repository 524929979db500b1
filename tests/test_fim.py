"""Fill-in-the-middle: the transform (rates, orders, reassembly), the prompt builder, the FIM tokens in
prepared corpora, tokenizer files, the HF export and the GGUF metadata."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptforge.data.corpus import CorpusError
from gptforge.data.shards import prepare_corpus
from gptforge.fim import (FIM_SPECIAL_TOKENS, FimError, choose_fim, cut_at_indent, fim_pieces, fim_tokens,
                          fim_training_ids,
                          infill_prompt, split_for_fim, split_lines_for_fim)
from gptforge.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

CODE = "def area(w, h):\n    return w * h\n\nprint(area(2, 3))  # é ü 中文\n"


@pytest.fixture(scope="module")
def fim_tok() -> Tokenizer:
    return Tokenizer.train_bpe([CODE] * 20, vocab_size=300, special_tokens=[*DEFAULT_SPECIAL_TOKENS, *FIM_SPECIAL_TOKENS])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.integers(0, 2**32 - 1))
def test_split_reassembles_the_text(text, seed):
    prefix, middle, suffix = split_for_fim(text, np.random.default_rng(seed))
    assert prefix + middle + suffix == text


def test_rates_and_orders_follow_the_settings():
    draws = [choose_fim(CODE, np.random.default_rng([7, i]), 0.5, 0.25) for i in range(4000)]
    chosen = [d for d in draws if d is not None]
    assert 0.45 < len(chosen) / len(draws) < 0.55
    spm = sum(order == "spm" for order, _ in chosen) / len(chosen)
    assert 0.2 < spm < 0.3
    assert all("".join(parts) == CODE for _, parts in chosen)
    assert all(choose_fim(CODE, np.random.default_rng(i), 0.0, 0.5) is None for i in range(200))
    assert all(choose_fim(CODE, np.random.default_rng(i), 1.0, 0.5) is not None for i in range(200))
    # Same seed, same draws.
    again = [choose_fim(CODE, np.random.default_rng([7, i]), 0.5, 0.25) for i in range(4000)]
    assert again == draws


def test_training_ids_in_both_orders(fim_tok):
    t = fim_tokens(fim_tok)
    p, m, s = [1, 2], [3], [4, 5]
    assert fim_training_ids(t, "psm", p, m, s) == [t.prefix, 1, 2, t.suffix, 4, 5, t.middle, 3]
    assert fim_training_ids(t, "spm", p, m, s) == [t.prefix, t.suffix, 4, 5, t.middle, 1, 2, 3]
    with pytest.raises(ValueError, match="order"):
        fim_training_ids(t, "pms", p, m, s)


def test_infill_prompt_is_psm_and_truncates_to_fit(fim_tok):
    t = fim_tokens(fim_tok)
    built = infill_prompt(fim_tok, "def area(w, h):\n", "\nprint(area(2, 3))\n")
    enc = fim_tok.encode
    assert built.ids == [t.prefix, *enc("def area(w, h):\n"), t.suffix, *enc("\nprint(area(2, 3))\n"), t.middle]
    assert not built.truncated
    cut = infill_prompt(fim_tok, CODE * 10, CODE * 10, extra=[("a.py", CODE)], max_prompt_tokens=40)
    assert len(cut.ids) <= 40 and cut.truncated
    assert cut.ids[-1] == t.middle and t.prefix in cut.ids and t.suffix in cut.ids
    # The prefix keeps its end (next to the gap), the suffix its start.
    pre = cut.ids[cut.ids.index(t.prefix) + 1:cut.ids.index(t.suffix)]
    suf = cut.ids[cut.ids.index(t.suffix) + 1:-1]
    assert pre == enc(CODE * 10)[-len(pre):] and suf == enc(CODE * 10)[:len(suf)]
    # Extra context without file separators: each chunk a document of its own, before the FIM prefix.
    with_extra = infill_prompt(fim_tok, "a", "b", extra=[("x.py", "print(1)\n")])
    assert with_extra.ids[:with_extra.ids.index(t.prefix)] == [*enc("print(1)\n"), fim_tok.eos_token_id]


def test_model_without_fim_tokens_gets_an_error_naming_them():
    plain = Tokenizer.train_bpe([CODE] * 5, vocab_size=280)
    assert fim_tokens(plain) is None
    with pytest.raises(FimError, match="<fim_prefix>, <fim_suffix>, <fim_middle>") as err:
        infill_prompt(plain, "a", "b")
    assert err.value.param == "suffix"


def test_cut_at_indent():
    assert cut_at_indent("x = 1\n    y = 2\nz = 3\n", 4) == ("x = 1\n    y = 2\n", True)
    assert cut_at_indent("x = 1\n\n    y = 2\n", 4) == ("x = 1\n\n    y = 2\n", False)
    assert cut_at_indent("a\nb", 0) == ("a\nb", False)


def _write_corpus(folder, n=30):
    folder.mkdir()
    for i in range(n):
        (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    return folder


def test_prepare_with_fim_is_deterministic_and_keeps_validation_plain(tmp_path):
    src = _write_corpus(tmp_path / "src")
    kw = dict(vocab_size=300, split="documents", val_fraction=0.2, fim_rate=0.5, progress=False)
    a = prepare_corpus([str(src)], tmp_path / "a", **kw)
    b = prepare_corpus([str(src)], tmp_path / "b", **kw)
    c = prepare_corpus([str(src)], tmp_path / "c", **{**kw, "fim_seed": 1})
    assert np.array_equal(a.tokens("train"), b.tokens("train"))
    assert not np.array_equal(a.tokens("train"), c.tokens("train"))
    tok = a.tokenizer
    t = fim_tokens(tok)
    assert t is not None and t.pad is not None
    assert 0 < a.manifest["fim"]["documents"] < 30
    markers = {t.prefix, t.suffix, t.middle}
    assert not markers & set(a.tokens("val").tolist())
    # Every FIM document reassembles to one of the files: undo the transform on the token stream.
    docs = tok.decode(a.tokens("train").tolist()).split("<|endoftext|>")
    originals = {f"def f{i}(x):\n    return x + {i}\n" for i in range(30)}
    undone = 0
    for doc in docs:
        if doc.startswith("<fim_prefix><fim_suffix>"):  # SPM
            suffix, rest = doc[len("<fim_prefix><fim_suffix>"):].split("<fim_middle>")
            doc, undone = rest + suffix, undone + 1
        elif doc.startswith("<fim_prefix>"):  # PSM
            prefix, rest = doc[len("<fim_prefix>"):].split("<fim_suffix>")
            suffix, middle = rest.split("<fim_middle>")
            doc, undone = prefix + middle + suffix, undone + 1
        assert doc in originals
    assert undone == a.manifest["fim"]["documents"]
    plain = prepare_corpus([str(src)], tmp_path / "plain", **{**kw, "fim_rate": 0.0})
    assert fim_tokens(plain.tokenizer) is None


def _undo_fim(text: str) -> str:
    """One FIM example (PSM or SPM, markers as text) back to the text it was made from."""
    if text.startswith("<fim_prefix><fim_suffix>"):
        suffix, rest = text[len("<fim_prefix><fim_suffix>"):].split("<fim_middle>")
        return rest + suffix
    prefix, rest = text[len("<fim_prefix>"):].split("<fim_suffix>")
    suffix, middle = rest.split("<fim_middle>")
    return prefix + middle + suffix


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=30), max_size=8).map("".join), st.integers(-1, 40))
def test_pieces_join_back_and_keep_to_the_limit(text, max_chars):
    pieces = fim_pieces(text, max_chars)
    assert "".join(pieces) == text
    if max_chars > 0:
        for piece in pieces:
            assert len(piece) <= max_chars or "\n" not in piece.rstrip("\n")  # only a single long line is longer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=12), max_size=6).map("".join), st.integers(0, 2**32 - 1))
def test_line_cuts_give_whole_lines(text, seed):
    prefix, middle, suffix = split_lines_for_fim(text, np.random.default_rng(seed))
    assert prefix + middle + suffix == text
    assert prefix == "" or prefix.endswith("\n")  # the middle starts a line...
    assert suffix == "" or suffix.startswith("\n")  # ...and ends one, before its newline


def test_prepare_draws_fim_per_piece_with_piece_chars(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = ["".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(12)) for i in range(8)]
    for i, text in enumerate(files):
        (src / f"m{i}.py").write_text(text)
    kw = dict(vocab_size=300, split="documents", val_fraction=0.0, fim_rate=0.5, progress=False)
    pieces = prepare_corpus([str(src)], tmp_path / "p", **kw, fim_piece_chars=80)
    whole = prepare_corpus([str(src)], tmp_path / "w", **kw)
    assert pieces.manifest["fim"]["piece_chars"] == 80 and whole.manifest["fim"]["piece_chars"] == 0
    assert pieces.manifest["fingerprint"] != whole.manifest["fingerprint"]
    tok = pieces.tokenizer
    docs = tok.decode(pieces.tokens("train").tolist()).split("<|endoftext|>")
    # Each file is plain pieces with FIM examples among them, each example ending with <|endoftext|>:
    # undo each example and drop the separators, and the stream is the files again, in order.
    rebuilt, examples = "", 0
    for part in docs:
        start = part.find("<fim_prefix>")
        if start >= 0:
            assert len(_undo_fim(part[start:])) <= 80  # one piece
            part, examples = part[:start] + _undo_fim(part[start:]), examples + 1
        rebuilt += part
    assert examples == pieces.manifest["fim"]["documents"] > whole.manifest["fim"]["documents"]
    assert rebuilt == "".join(files)
    with pytest.raises(CorpusError, match="fim_piece_chars"):
        prepare_corpus([str(src)], tmp_path / "x", **kw, fim_piece_chars=-5)


def test_prepare_fim_settings_are_checked(tmp_path):
    src = _write_corpus(tmp_path / "src", 3)
    with pytest.raises(CorpusError, match="split 'documents'"):
        prepare_corpus([str(src)], tmp_path / "o", fim_rate=0.5, progress=False)
    with pytest.raises(CorpusError, match="fim_rate"):
        prepare_corpus([str(src)], tmp_path / "o", fim_rate=1.5, split="documents", progress=False)
    with pytest.raises(CorpusError, match="fim_spm_rate"):
        prepare_corpus([str(src)], tmp_path / "o", fim_rate=0.5, fim_spm_rate=-1, split="documents", progress=False)


def test_prepare_adds_fim_tokens_to_a_given_tokenizer(tmp_path):
    src = _write_corpus(tmp_path / "src")
    given_tok = Tokenizer.train_bpe([CODE] * 5, vocab_size=280)
    given_tok.save(tmp_path / "tok")
    corpus = prepare_corpus([str(src)], tmp_path / "o", tokenizer=str(tmp_path / "tok"), split="documents",
                            fim_rate=1.0, val_fraction=0.1, progress=False)
    t = fim_tokens(corpus.tokenizer)
    assert t is not None and min(t.prefix, t.suffix, t.middle) >= given_tok.vocab_size
    assert fim_tokens(Tokenizer.from_file(tmp_path / "tok")) is None  # the given files are left alone


def test_fim_tokens_survive_save_load_and_hf(tmp_path, fim_tok):
    fim_tok.save(tmp_path / "tok")
    loaded = Tokenizer.from_file(tmp_path / "tok")
    assert fim_tokens(loaded) == fim_tokens(fim_tok)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert set(FIM_SPECIAL_TOKENS) <= set(config["additional_special_tokens"])
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert set(FIM_SPECIAL_TOKENS) <= set(hf.all_special_tokens)
    ids = hf("<fim_prefix>def<fim_suffix>x<fim_middle>")["input_ids"]
    t = fim_tokens(fim_tok)
    assert ids[0] == t.prefix and t.suffix in ids and ids[-1] == t.middle
    assert hf.decode(ids, skip_special_tokens=True) == "defx"


def test_gguf_export_writes_llama_cpp_fim_keys(tmp_path, fim_tok):
    import gguf
    import torch

    from gptforge.config import Config
    from gptforge.interop.gguf import export_gguf
    from gptforge.model import GPT

    torch.manual_seed(0)
    config = Config(name="t", family="llama", vocab_size=fim_tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                    n_embd=32, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    path = export_gguf(GPT(config), tmp_path / "m.gguf", fim_tok)
    reader = gguf.GGUFReader(str(path))
    t = fim_tokens(fim_tok)

    def value(key):
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    keys = gguf.Keys.Tokenizer
    assert value(keys.FIM_PRE_ID) == t.prefix
    assert value(keys.FIM_SUF_ID) == t.suffix
    assert value(keys.FIM_MID_ID) == t.middle
    assert value(keys.FIM_PAD_ID) == t.pad
    assert keys.FIM_SEP_ID not in reader.fields


def test_a_tokenizer_with_its_own_fim_tokens_keeps_them(tmp_path):
    src = _write_corpus(tmp_path / "src")
    qwen_style = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    Tokenizer.train_bpe([CODE] * 5, vocab_size=290, special_tokens=qwen_style).save(tmp_path / "tok")
    corpus = prepare_corpus([str(src)], tmp_path / "o", tokenizer=str(tmp_path / "tok"), split="documents",
                            fim_rate=1.0, val_fraction=0.1, progress=False)
    tok = corpus.tokenizer
    assert tok.token_to_id("<fim_prefix>") is None
    assert fim_tokens(tok).prefix == tok.token_to_id("<|fim_prefix|>")
    assert tok.token_to_id("<|fim_prefix|>") in corpus.tokens("train").tolist()
