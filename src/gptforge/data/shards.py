"""Token shards: a corpus tokenized into flat uint16/uint32 `.bin` files plus a JSON manifest.

Layout of a prepared folder:
    manifest.json       dtype, vocab size, tokenizer, sources + fingerprint, counts, shards, splits
    tokenizer/          tokenizer.json + tokenizer_config.json
    tokens_0000.bin     raw little-endian token ids (numpy `tofile`), documents joined by EOS when the
                        tokenizer has one; `split: documents` writes train_*.bin and val_*.bin instead
A split is a list of segments {file, start, end} (token offsets), so the classic "last 10% of the
stream is validation" split needs no copy. The whole folder is written with `atomic_directory`:
an error or a kill leaves the previous folder (or none), never partial shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..atomic import atomic_directory, atomic_write_text, read_json
from ..fim import FIM_SPECIAL_TOKENS, choose_fim, fim_pieces, fim_tokens, fim_training_ids
from ..tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, TokenizerError
from .corpus import Corpus, CorpusError, Document

log = logging.getLogger(__name__)

FORMAT = "gptforge-token-shards"
VERSION = 1
DTYPE_LIMITS = {"uint16": 2 ** 16, "uint32": 2 ** 32}
SPLIT_METHODS = ("tail", "documents")
MANIFEST = "manifest.json"


@dataclass
class PreparedCorpus:
    """A prepared folder: its manifest, tokenizer and split segments."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.directory / "tokenizer")

    def segments(self, split: str) -> list[tuple[Path, int, int]]:
        """(file, start, end) token ranges of `split` ("train" or "val")."""
        if split not in self.manifest["splits"]:
            raise CorpusError(f"{self.directory}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        return [(self.directory / s["file"], int(s["start"]), int(s["end"])) for s in self.manifest["splits"][split]]

    def num_tokens(self, split: str) -> int:
        return sum(end - start for _, start, end in self.segments(split))

    def tokens(self, split: str) -> np.ndarray:
        """All tokens of `split` as one array (loads them; for small corpora and tests)."""
        parts = [np.memmap(path, dtype=self.dtype, mode="r")[start:end] for path, start, end in self.segments(split)
                 if end > start]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def load_prepared(directory: str | Path) -> PreparedCorpus:
    """Open a folder written by `prepare_corpus`, checking that every shard has its recorded size."""
    directory = Path(directory)
    path = directory / MANIFEST
    manifest = read_json(path, CorpusError, f"{directory}: not a prepared corpus (no {MANIFEST}); "
                         "run `gptforge prepare` first")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CorpusError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        file = directory / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
            raise CorpusError(f"{file}: missing or wrong size (expected {shard['tokens']} tokens); "
                              "prepare the corpus again")
    return PreparedCorpus(directory, manifest)


class _ShardWriter:
    """Appends token arrays to `<prefix>_NNNN.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.prefix, self.dtype, self.shard_tokens = directory, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.handle = None
        self.total = 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self.handle is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            part.astype(self.dtype, copy=False).tofile(self.handle)
            self.shards[-1]["tokens"] += int(part.size)
            self.total += int(part.size)

    def _roll(self) -> None:
        if self.handle is not None:
            self.handle.close()
        name = f"{self.prefix}_{len(self.shards):04d}.bin"
        self.handle = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _pick_dtype(dtype: str, vocab_size: int) -> str:
    if dtype == "auto":
        return "uint16" if vocab_size <= DTYPE_LIMITS["uint16"] else "uint32"
    if dtype not in DTYPE_LIMITS:
        raise CorpusError(f"dtype must be 'auto', 'uint16' or 'uint32', got {dtype!r}")
    if vocab_size > DTYPE_LIMITS[dtype]:
        raise CorpusError(f"vocab size {vocab_size} does not fit dtype {dtype} (at most {DTYPE_LIMITS[dtype]} ids); "
                          "use dtype uint32 or 'auto'")
    return dtype


def doc_in_val(text: str, val_fraction: float) -> bool:
    """Stable per-document coin from its content: a document (and any duplicate) always lands in one split."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


def _batched(docs: Iterator[Document], max_bytes: int, chunk_chars: Optional[int]) -> Iterator[list[Document]]:
    """Group documents (~max_bytes per group) for parallel encode_batch; long texts split for char tokenizers."""
    batch: list[Document] = []
    size = 0
    for doc in docs:
        pieces = [doc]
        if chunk_chars and len(doc.text) > chunk_chars:
            # Char tokenizers map each character on its own, so any cut point gives the same ids.
            pieces = [Document(doc.name if i == 0 else "", doc.text[i:i + chunk_chars])
                      for i in range(0, len(doc.text), chunk_chars)]
        for piece in pieces:
            batch.append(piece)
            size += len(piece.text)
            if size >= max_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _CharTable:
    """Vectorised encoding for char tokenizers: one table lookup per code point, same ids as `encode`."""

    def __init__(self, tok: Tokenizer) -> None:
        vocab = tok.backend.get_vocab(with_added_tokens=True)
        singles = {ord(t): i for t, i in vocab.items() if len(t) == 1}
        self.specials = [t for t in vocab if len(t) > 1]
        self.keys = np.array(sorted(singles), dtype=np.uint32)
        self.ids = np.array([singles[k] for k in sorted(singles)], dtype=np.int64)

    def encode(self, text: str) -> Optional[np.ndarray]:
        """Ids of `text`, or None when the tokenizer itself must decide (special tokens, unknown chars)."""
        if any(s in text for s in self.specials):
            return None
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self.keys, points)
        pos = np.minimum(pos, len(self.keys) - 1)
        if not np.array_equal(self.keys[pos], points):
            return None
        return self.ids[pos]


def _make_tokenizer(tokenizer: Any, corpus: Corpus, vocab_size: int, extra_specials: tuple[str, ...] = ()) -> Tokenizer:
    """The corpus tokenizer; `extra_specials` (the FIM tokens) are part of a trained one, added to a given one."""
    if isinstance(tokenizer, Tokenizer):
        return _add_specials(tokenizer, extra_specials)
    kind = str(tokenizer)
    if kind == "bpe":
        log.info("Training a byte-level BPE tokenizer with a %s-token vocabulary...", f"{vocab_size:,}")
        try:
            return Tokenizer.train_bpe((d.text for d in corpus.documents()), vocab_size=vocab_size,
                                       special_tokens=[*DEFAULT_SPECIAL_TOKENS, *extra_specials])
        except TokenizerError as exc:
            raise CorpusError(f"tokenizer: {exc}") from exc
    if kind == "char":
        chars: set[str] = set()
        docs = 0
        for doc in corpus.documents():
            chars.update(doc.text)
            docs += 1
        if not chars:
            raise CorpusError(_empty_message(corpus))
        # Several documents need a separator token; one text (e.g. tinyshakespeare) keeps nanoGPT's ids.
        specials = ["<|endoftext|>"] if docs > 1 or extra_specials else []
        return Tokenizer.train_char([''.join(sorted(chars))], special_tokens=[*specials, *extra_specials])
    path = Path(kind)
    if path.exists():
        return _add_specials(Tokenizer.from_file(path), extra_specials)
    raise CorpusError(f"tokenizer must be 'bpe', 'char' or a path to a tokenizer.json / folder, got {kind!r} "
                      "(no such path)")


def _add_specials(tok: Tokenizer, extra_specials: tuple[str, ...]) -> Tokenizer:
    """A given tokenizer with the FIM tokens; one that has its own (e.g. Qwen's <|fim_prefix|>) keeps them."""
    if not extra_specials or fim_tokens(tok) is not None:
        return tok
    return tok.with_special_tokens(extra_specials)


def _empty_message(corpus: Corpus) -> str:
    specs = [s.spec for s in corpus.sources]
    extra = f" ({len(corpus.skipped)} undecodable file(s) skipped: {corpus.skipped[:3]})" if corpus.skipped else ""
    return f"corpus is empty: sources {specs} yielded no text{extra}"


def prepare_corpus(sources: list[str] | str, out_dir: str | Path, *, tokenizer: Any = "bpe", vocab_size: int = 8192,
                   val_fraction: float = 0.1, split: str = "tail", text_field: str = "text",
                   on_decode_error: str = "fail", dtype: str = "auto", shard_tokens: int = 1 << 27,
                   max_bytes: Optional[int] = None, force: bool = False, progress: bool = True,
                   fim_rate: float = 0.0, fim_spm_rate: float = 0.5, fim_seed: int = 0,
                   fim_piece_chars: int = 0, fim_line_rate: float = 0.0) -> PreparedCorpus:
    """Tokenize `sources` into token shards in `out_dir`; reuse the folder when nothing changed.

    sources: file/folder/glob paths, .jsonl/.parquet files (`text_field`), "stdlib", or "hf:NAME[:CONFIG][@SPLIT]".
    tokenizer: "bpe" (train byte-level BPE of `vocab_size`), "char", a tokenizer path, or a `Tokenizer`.
    split: "tail" (the last `val_fraction` of the token stream is validation) or "documents" (each
    document goes to validation with probability `val_fraction`, decided by a hash of its text).
    on_decode_error: "fail" or "skip" for files that are not UTF-8 (skipped files are listed in the manifest).
    dtype: "auto" (uint16 when the vocab fits, else uint32), "uint16" or "uint32".
    fim_rate: share of training documents written in fill-in-the-middle form (gptforge.fim), in SPM order
    with probability `fim_spm_rate`, else PSM; the draws come from (`fim_seed`, document number), so the
    same seed gives the same shards. The FIM tokens join the tokenizer; validation documents stay as they
    are (so validation loss stays left-to-right), which needs split "documents". `fim_piece_chars` > 0
    cuts each training document at line ends into pieces of at most that many characters and draws FIM
    for each piece (each FIM piece ends with the end-of-text token): "context-level" FIM (Bavarian et al.,
    2022), for training windows much shorter than files, where a whole-file example's prefix, suffix and
    middle never share a window. `fim_line_rate`: the share of FIM examples whose middle is whole lines
    (cut at line boundaries, as an editor asks for the lines between the code above and below); the rest
    are cut at two uniform character positions.
    Returns the `PreparedCorpus`; raises CorpusError (a ValueError) naming the bad input.
    """
    # ~75 lines under the docstring, in the order the work happens: checks, reuse, tokenizer, shards
    # (`_SplitWriter`, `_encode_batch`), manifest; the loop keeps the document counters in one place.
    out_dir = Path(out_dir)
    if split not in SPLIT_METHODS:
        raise CorpusError(f"split must be one of {SPLIT_METHODS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise CorpusError(f"shard_tokens must be positive, got {shard_tokens}")
    _check_fim(fim_rate, fim_spm_rate, split, fim_piece_chars, fim_line_rate)
    if isinstance(tokenizer, str) and tokenizer == "bpe":
        _pick_dtype(dtype, vocab_size)  # fail before training a tokenizer that cannot be stored
    corpus = Corpus(sources, text_field=text_field, on_decode_error=on_decode_error, max_bytes=max_bytes)
    settings = _settings(tokenizer, vocab_size, val_fraction, split, dtype, shard_tokens, fim_rate, fim_spm_rate,
                         fim_seed, fim_piece_chars, fim_line_rate)
    fingerprint = hashlib.sha256(json.dumps([corpus.fingerprint(), settings], sort_keys=True,
                                            default=str).encode()).hexdigest()
    existing = _up_to_date(out_dir, fingerprint, force)
    if existing is not None:
        return existing

    if next(iter(corpus.documents()), None) is None:  # before training a tokenizer or drawing a bar
        raise CorpusError(_empty_message(corpus))
    tok = _make_tokenizer(tokenizer, corpus, vocab_size, FIM_SPECIAL_TOKENS if fim_rate > 0 else ())
    fim = fim_tokens(tok) if fim_rate > 0 else None
    dtype_name = _pick_dtype(dtype, tok.vocab_size)
    np_dtype = np.dtype(dtype_name)
    eos = tok.eos_token_id
    started = time.perf_counter()

    with atomic_directory(out_dir) as tmp:
        tok.save(tmp / "tokenizer")
        out = _SplitWriter(tmp, split, val_fraction, np_dtype, shard_tokens, eos)
        n_docs = n_chars = 0
        bar = None
        if progress:
            from ..progress import Progress

            bar = Progress(corpus.input_bytes(), desc="tokenize", unit="B", unit_scale=True)
        chunk = (1 << 20) if tok.kind == "char" and fim is None else None  # FIM cuts whole documents
        char_table = _CharTable(tok) if tok.kind == "char" else None
        n_fim = 0
        try:
            for batch in _batched(corpus.documents(), 4 << 20, chunk):
                plans = [None] * len(batch)
                if fim is not None:
                    plans = [_fim_plan(doc, n_docs + i, fim_rate, fim_spm_rate, fim_seed, fim_piece_chars, fim_line_rate,
                                       split == "documents" and doc_in_val(doc.text, val_fraction))
                             for i, doc in enumerate(batch)]
                    n_fim += sum(1 for plan in plans if plan for order, _ in plan if order != "plain")
                for doc, ids in zip(batch, _encode_batch(batch, plans, tok, char_table, fim, eos)):
                    arr = np.asarray(ids, dtype=np.int64)
                    if arr.size and int(arr.max()) >= DTYPE_LIMITS[dtype_name]:
                        raise CorpusError(f"token id {int(arr.max())} does not fit {dtype_name}")
                    n_docs += out.write(doc, arr)
                    n_chars += len(doc.text)
                if bar is not None:
                    bar.update(sum(len(d.text.encode("utf-8")) for d in batch))
        finally:
            out.close()
            if bar is not None:
                bar.close()
        total, shards, splits = out.finish(n_docs)
        if total == 0:
            raise CorpusError(_empty_message(corpus))
        manifest = {
            "format": FORMAT, "version": VERSION, "fingerprint": fingerprint, **_contents(corpus, tok, text_field),
            "dtype": dtype_name, "documents": n_docs, "characters": n_chars, "num_tokens": total,
            "split": {"method": split, "val_fraction": val_fraction},
            "fim": {"rate": fim_rate, "spm_rate": fim_spm_rate, "seed": fim_seed, "piece_chars": fim_piece_chars,
                    "line_rate": fim_line_rate,
                    "documents": n_fim},  # FIM examples: documents, or pieces when piece_chars > 0
            "split_tokens": {name: sum(s["end"] - s["start"] for s in segs) for name, segs in splits.items()},
            "shards": shards, "splits": splits, "settings": settings,
            "seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    log.debug("prepared %s: %d documents, %d tokens (%s), train %d / val %d", out_dir, n_docs, total, dtype_name,
              manifest["split_tokens"]["train"], manifest["split_tokens"]["val"])
    # Each skipped file was reported as it was read (corpus.py); the manifest lists them all.
    return load_prepared(out_dir)


def _encode_batch(batch: list[Document], plans: list[Any], tok: Tokenizer, char_table: Optional[_CharTable],
                  fim: Any, eos: Optional[int] = None) -> list[list[int]]:
    """Token ids of each document: its text, or, with a plan, its pieces in order: plain ones as they are,
    FIM ones (three parts, then assembled) followed by the end-of-text token unless the document ends there."""
    texts = [t for doc, plan in zip(batch, plans) for _, parts in (plan or [("plain", (doc.text,))]) for t in parts]
    fast = [char_table.encode(t) for t in texts] if char_table else [None] * len(texts)
    slow = [t for t, ids in zip(texts, fast) if ids is None]
    slow_ids = iter(tok.encode_batch(slow, add_special_tokens=False) if slow else [])
    pieces = iter([ids if ids is not None else next(slow_ids) for ids in fast])
    out: list[list[int]] = []
    for plan in plans:
        if not plan:
            out.append(next(pieces))
            continue
        ids: list[int] = []
        for i, (order, _) in enumerate(plan):
            if order == "plain":
                ids.extend(next(pieces))
                continue
            ids.extend(fim_training_ids(fim, order, *(next(pieces) for _ in range(3))))
            if i < len(plan) - 1 and eos is not None:  # the middle ends here; the document's end has its own
                ids.append(eos)
        out.append(ids)
    return out


def _contents(corpus: Corpus, tok: Tokenizer, text_field: str) -> dict[str, Any]:
    """The manifest's record of where the text came from and how it was tokenized."""
    return {"sources": [s.spec for s in corpus.sources], "text_field": text_field,
            "tokenizer": {"dir": "tokenizer", "kind": tok.kind, "vocab_size": tok.vocab_size,
                          "eos_token_id": tok.eos_token_id},
            "vocab_size": tok.vocab_size, "skipped": list(corpus.skipped),
            "selection": [sel.to_dict() for sel in corpus.selections]}


def _settings(tokenizer: Any, vocab_size: int, val_fraction: float, split: str, dtype: str, shard_tokens: int,
              fim_rate: float, fim_spm_rate: float, fim_seed: int, fim_piece_chars: int = 0,
              fim_line_rate: float = 0.0) -> dict[str, Any]:
    """What, besides the input texts, decides the prepared corpus (part of its fingerprint)."""
    settings: dict[str, Any] = {"tokenizer": tokenizer if isinstance(tokenizer, str) else hashlib.sha256(
        tokenizer.backend.to_str().encode()).hexdigest(), "vocab_size": vocab_size, "val_fraction": val_fraction,
        "split": split, "dtype": dtype, "shard_tokens": shard_tokens, "version": VERSION}
    if fim_rate > 0:  # only then, so that corpora prepared before FIM existed keep their fingerprint
        settings["fim"] = {"rate": fim_rate, "spm_rate": fim_spm_rate, "seed": fim_seed}
        if fim_piece_chars > 0:
            settings["fim"]["piece_chars"] = fim_piece_chars
        if fim_line_rate > 0:
            settings["fim"]["line_rate"] = fim_line_rate
    if isinstance(tokenizer, str) and tokenizer not in ("bpe", "char") and Path(tokenizer).exists():
        tok_file = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
        settings["tokenizer_hash"] = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else None
    return settings


def _up_to_date(out_dir: Path, fingerprint: str, force: bool) -> Optional[PreparedCorpus]:
    """The corpus already in `out_dir` when it was made from the same inputs and settings; refuses other folders."""
    if not out_dir.exists():
        return None
    if (out_dir / MANIFEST).is_file():
        if not force:
            try:
                existing = load_prepared(out_dir)
                if existing.manifest.get("fingerprint") == fingerprint:
                    log.info("%s is up to date (same inputs and settings): reusing it.", out_dir)
                    return existing
            except CorpusError:
                pass  # damaged: rebuild
        log.info("The inputs or settings changed: rebuilding %s.", out_dir)
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        raise CorpusError(f"output folder {out_dir} exists and is not a prepared corpus (no {MANIFEST}); "
                          "choose an empty or new folder")
    elif not out_dir.is_dir():
        raise CorpusError(f"output path {out_dir} exists and is not a folder")
    return None


class _SplitWriter:
    """Token shards of one corpus: one stream split at its tail, or train and validation files by document."""

    def __init__(self, folder: Path, split: str, val_fraction: float, dtype: np.dtype, shard_tokens: int,
                 eos: Optional[int]) -> None:
        self.folder, self.split, self.val_fraction, self.eos = folder, split, val_fraction, eos
        names = {"all": "tokens"} if split == "tail" else {"train": "train", "val": "val"}
        self.writers = {key: _ShardWriter(folder, name, dtype, shard_tokens) for key, name in names.items()}
        self.first_doc = True
        self.current = "train"  # split of the document being written (continuation pieces follow it)

    def write(self, doc: Document, ids: np.ndarray) -> int:
        """Append one document (or continuation piece) with its separator; returns 1 when a document starts."""
        starts_doc = doc.name != ""  # continuation pieces of a split text carry no name
        if self.split == "tail":
            target = self.writers["all"]
            needs_eos = starts_doc and not self.first_doc
        else:
            if starts_doc:
                self.current = "val" if doc_in_val(doc.text, self.val_fraction) else "train"
            target = self.writers[self.current]
            needs_eos = starts_doc and bool(target.total)
        if needs_eos and self.eos is not None:
            target.write(np.asarray([self.eos], dtype=np.int64))
        self.first_doc = False
        target.write(ids)
        return int(starts_doc)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()

    def finish(self, n_docs: int) -> tuple[int, list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """(total tokens, shard list, train/val segments); removes empty shard files."""
        total = sum(w.total for w in self.writers.values())
        shards = [s for w in self.writers.values() for s in w.shards if s["tokens"] > 0]
        for w in self.writers.values():  # a roll at an exact boundary can leave an empty file
            for s in w.shards:
                if s["tokens"] == 0:
                    (self.folder / s["file"]).unlink(missing_ok=True)
        if total == 0:
            return 0, shards, {}
        if self.split == "tail":
            n_val = int(math.ceil(total * self.val_fraction)) if self.val_fraction > 0 else 0
            return total, shards, {"train": _range_segments(shards, 0, total - n_val),
                                   "val": _range_segments(shards, total - n_val, total)}
        splits = {name: [{"file": s["file"], "start": 0, "end": s["tokens"]} for s in w.shards if s["tokens"]]
                  for name, w in self.writers.items()}
        if self.val_fraction > 0 and not splits["val"]:
            raise CorpusError(f"split 'documents' put none of the {n_docs} documents into validation; "
                              "use split 'tail' or a larger val_fraction")
        return total, shards, splits


def _check_fim(fim_rate: float, fim_spm_rate: float, split: str, fim_piece_chars: int = 0,
               fim_line_rate: float = 0.0) -> None:
    if not 0.0 <= fim_line_rate <= 1.0:
        raise CorpusError(f"fim_line_rate must be in [0, 1] (the share of FIM examples cut at line boundaries), "
                          f"got {fim_line_rate}")
    if isinstance(fim_piece_chars, bool) or not isinstance(fim_piece_chars, int) or fim_piece_chars < 0:
        raise CorpusError(f"fim_piece_chars must be a whole number >= 0 (0: whole documents), got {fim_piece_chars!r}")
    if not 0.0 <= fim_rate <= 1.0:
        raise CorpusError(f"fim_rate must be in [0, 1] (the share of documents in fill-in-the-middle form), "
                          f"got {fim_rate}")
    if not 0.0 <= fim_spm_rate <= 1.0:
        raise CorpusError(f"fim_spm_rate must be in [0, 1] (the share of FIM documents in SPM order), got {fim_spm_rate}")
    if fim_rate > 0 and split != "documents":
        raise CorpusError("fim_rate > 0 needs split 'documents': validation documents stay left-to-right, and "
                          f"with split {split!r} which documents validate is only known after tokenizing")


def _fim_plan(doc: Document, index: int, rate: float, spm_rate: float, seed: int, piece_chars: int,
              line_rate: float, in_val: bool) -> Optional[list[tuple[str, tuple[str, ...]]]]:
    """The document as pieces, each ("plain", (text,)) or (order, (prefix, middle, suffix)); None when no
    piece is written in FIM form. With `piece_chars` <= 0 the document is one piece."""
    if in_val or not doc.name:  # validation, or a continuation piece (none when FIM is on)
        return None
    rng = np.random.default_rng([seed, index])
    plan: list[tuple[str, tuple[str, ...]]] = []
    for piece in fim_pieces(doc.text, piece_chars):
        chosen = choose_fim(piece, rng, rate, spm_rate, line_rate)
        plan.append(chosen if chosen is not None else ("plain", (piece,)))
    return plan if any(order != "plain" for order, _ in plan) else None


def _range_segments(shards: list[dict[str, Any]], begin: int, end: int) -> list[dict[str, Any]]:
    """Segments covering global token offsets [begin, end) of consecutive shards."""
    segments, offset = [], 0
    for shard in shards:
        lo, hi = offset, offset + shard["tokens"]
        s, e = max(begin, lo), min(end, hi)
        if s < e:
            segments.append({"file": shard["file"], "start": s - lo, "end": e - lo})
        offset = hi
    return segments


__all__ = ["prepare_corpus", "load_prepared", "PreparedCorpus", "FORMAT", "VERSION", "SPLIT_METHODS"]
