"""Corpora and token shards: sources, shard format, manifest, reuse, splits and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from gptforge.data.corpus import Corpus, CorpusError, iter_documents, stdlib_files, stdlib_root
from gptforge.data.shards import load_prepared, prepare_corpus
from gptforge.tokenizer import Tokenizer

TEXT_A = "To be, or not to be, that is the question.\n" * 20
TEXT_B = "Whether 'tis nobler in the mind to suffer\n" * 20


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(TEXT_B)
    (folder / "a.txt").write_text(TEXT_A)
    (folder / "sub" / "c.md").write_text("# heading\n" * 30)
    (folder / ".hidden").write_text("never read")
    return folder


def test_sources_resolve_in_deterministic_order(corpus_dir, tmp_path):
    names = [Path(d.name).name for d in iter_documents([str(corpus_dir)])]
    assert names == ["a.txt", "b.txt", "c.md"]
    globbed = [Path(d.name).name for d in iter_documents([str(corpus_dir / "**" / "*.md"), str(corpus_dir / "b.txt")])]
    assert globbed == ["c.md", "b.txt"]


def test_jsonl_and_parquet_text_fields(tmp_path):
    rows = [{"text": "first doc"}, {"text": "second doc", "meta": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [d.text for d in iter_documents([str(tmp_path / "d.jsonl")])] == ["first doc", "second doc"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1", "p2", None]}), tmp_path / "d.parquet")
    assert [d.text for d in iter_documents([str(tmp_path / "d.parquet")], text_field="body")] == ["p1", "p2"]
    with pytest.raises(CorpusError, match="no column 'text'.*body"):
        list(iter_documents([str(tmp_path / "d.parquet")]))
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: no text field 'text'"):
        list(iter_documents([str(tmp_path / "bad.jsonl")]))


def test_stdlib_corpus_is_the_standard_library():
    root = stdlib_root()
    files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert {"os.py", "json/__init__.py"} <= set(rel)
    assert rel == sorted(rel)
    assert not any(part in ("site-packages", "test", "__pycache__") for f in files for part in f.relative_to(root).parts)
    docs = list(iter_documents(["stdlib"], max_bytes=5000))
    assert docs and {d.name for d in docs} <= {str(f) for f in files}  # a sample of whole files
    assert sum(len(d.text.encode()) for d in docs) <= 5000


def test_hf_dataset_offline_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match=r"someone/corpus.*network access"):
        list(iter_documents(["hf:someone/corpus@train"]))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt.*no such file"):
        Corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(CorpusError, match="no files match"):
        Corpus([str(tmp_path / "*.none")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="corpus is empty"):
        prepare_corpus([str(tmp_path / "empty.txt")], tmp_path / "out", tokenizer="char", progress=False)
    assert not (tmp_path / "out").exists()


def test_undecodable_files_fail_or_skip_by_flag(corpus_dir, tmp_path):
    (corpus_dir / "z.bin").write_bytes(b"\xff\xfe\x00binary")
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"z.bin: not valid UTF-8.*skip"):
        prepare_corpus([str(corpus_dir)], out, tokenizer="char", progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no partial shards, no temp folder
    prepared = prepare_corpus([str(corpus_dir)], out, tokenizer="char", on_decode_error="skip", progress=False)
    assert prepared.manifest["skipped"] == [str(corpus_dir / "z.bin")]
    assert prepared.manifest["documents"] == 3


def test_shard_format_and_manifest(corpus_dir, tmp_path):
    prepared = prepare_corpus([str(corpus_dir)], tmp_path / "out", tokenizer="bpe", vocab_size=300,
                              val_fraction=0.25, shard_tokens=100, progress=False)
    m = prepared.manifest
    tok = Tokenizer.from_file(tmp_path / "out" / "tokenizer")
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size == prepared.vocab_size
    assert len(m["shards"]) > 1 and all(s["tokens"] <= 100 for s in m["shards"])
    for shard in m["shards"]:
        assert (tmp_path / "out" / shard["file"]).stat().st_size == 2 * shard["tokens"]
    # The stream is the documents in order, joined by EOS; the last 25% is validation.
    eos = tok.eos_token_id
    texts = [TEXT_A, TEXT_B, "# heading\n" * 30]
    expected = []
    for i, text in enumerate(texts):
        expected += ([eos] if i else []) + tok.encode(text)
    stream = np.concatenate([prepared.tokens("train"), prepared.tokens("val")])
    assert stream.tolist() == expected
    assert m["split_tokens"]["val"] == int(np.ceil(len(expected) * 0.25))
    assert m["num_tokens"] == len(expected) and m["documents"] == 3


def test_reuse_when_inputs_unchanged_and_rebuild_when_changed(corpus_dir, tmp_path):
    out = tmp_path / "out"
    first = prepare_corpus([str(corpus_dir)], out, tokenizer="char", progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    again = prepare_corpus([str(corpus_dir)], out, tokenizer="char", progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert again.manifest == first.manifest
    (corpus_dir / "a.txt").write_text(TEXT_A + "more words\n")
    changed = prepare_corpus([str(corpus_dir)], out, tokenizer="char", progress=False)
    assert changed.manifest["num_tokens"] == first.manifest["num_tokens"] + len("more words\n")


def test_preparation_is_deterministic(corpus_dir, tmp_path):
    a = prepare_corpus([str(corpus_dir)], tmp_path / "a", tokenizer="bpe", vocab_size=300, progress=False)
    b = prepare_corpus([str(corpus_dir)], tmp_path / "b", tokenizer="bpe", vocab_size=300, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(a.tokens(split), b.tokens(split))
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_bytes()


def test_document_split_keeps_documents_whole(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"document number {i} " * 5)
    prepared = prepare_corpus([str(docs)], tmp_path / "out", tokenizer="char", split="documents",
                              val_fraction=0.3, progress=False)
    tok = prepared.tokenizer
    val_text = tok.decode(prepared.tokens("val").tolist())
    train_text = tok.decode(prepared.tokens("train").tolist())
    val_docs = {i for i in range(40) if f"document number {i} " in val_text}
    assert 0 < len(val_docs) < 40
    assert all(f"document number {i} " not in train_text for i in val_docs)


def test_vocab_too_large_for_dtype(tmp_path, corpus_dir):
    with pytest.raises(CorpusError, match="does not fit dtype uint16"):
        prepare_corpus([str(corpus_dir)], tmp_path / "out", tokenizer="bpe", vocab_size=70000, dtype="uint16",
                       progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_into_a_foreign_folder(tmp_path, corpus_dir):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a prepared corpus"):
        prepare_corpus([str(corpus_dir)], foreign, tokenizer="char", progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_damaged_shard_is_detected(tmp_path, corpus_dir):
    prepare_corpus([str(corpus_dir)], tmp_path / "out", tokenizer="char", progress=False)
    shard = next((tmp_path / "out").glob("tokens_*.bin"))
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorpusError, match="wrong size"):
        load_prepared(tmp_path / "out")


def test_prepare_cli(tmp_path, corpus_dir, capsys):
    from gptforge.cli import main

    assert main(["prepare", str(corpus_dir), "--out", str(tmp_path / "out"), "--tokenizer", "char",
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 3 and summary["dtype"] == "uint16"
    # For people: sentences with the counts, where the shards and tokenizer are, and what to run next.
    assert main(["prepare", str(corpus_dir), "--out", str(tmp_path / "out"), "--tokenizer", "char",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    out = tmp_path / "out"
    assert captured.out.startswith(f"Prepared 3 documents as {summary['tokens']:,} tokens: "
                                   f"{summary['train_tokens']:,} for training and {summary['val_tokens']:,} for "
                                   "validation.")
    assert f"listed in {out / 'manifest.json'}" in captured.out
    assert f"tokenizer:    {out / 'tokenizer'} (character-level" in captured.out
    assert f"gptforge pretrain --config RECIPE.yaml --data.dir={out}" in captured.out
    assert "up to date" in captured.err and "{" not in captured.out
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err


def test_empty_corpus_fails_before_tokenizer_training(tmp_path, capsys):
    from gptforge.cli import main

    (tmp_path / "empty.txt").write_text("")
    assert main(["prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    assert err.strip() == f"gptforge prepare: error: corpus is empty: sources ['{empty}'] yielded no text"
    assert not (tmp_path / "out").exists()


def test_undecodable_file_is_reported_once(tmp_path, capsys):
    from gptforge.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("plain text " * 50)
    (tmp_path / "notes" / "blob.bin").write_bytes(b"\xff\xfe binary")
    assert main(["prepare", str(tmp_path / "notes"), "--out", str(tmp_path / "out"), "--tokenizer", "bpe",
                 "--vocab-size", "300", "--on-decode-error", "skip", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("blob.bin: not valid UTF-8") == 1, captured.err
    assert "skipped:      1 file(s) that are not UTF-8" in captured.out
