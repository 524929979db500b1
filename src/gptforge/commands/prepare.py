"""`gptforge prepare`: tokenize corpora into token shards + manifest (reused when nothing changed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TOKENIZER_KINDS = {"bpe": "byte-level BPE", "char": "character-level"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+",
                        help="files, folders, globs, .jsonl/.parquet files, 'stdlib', or hf:NAME[:CONFIG][@SPLIT]")
    parser.add_argument("-o", "--out", required=True, help="output folder for shards, tokenizer and manifest.json")
    parser.add_argument("--tokenizer", default="bpe", help="bpe | char | path to tokenizer.json or folder (default bpe)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens for validation (default 0.1)")
    parser.add_argument("--split", choices=["tail", "documents"], default="tail",
                        help="tail: last fraction of the stream; documents: per-document hash (default tail)")
    parser.add_argument("--text-field", default="text", help="field/column holding text in JSONL/Parquet/HF data")
    parser.add_argument("--on-decode-error", choices=["fail", "skip"], default="fail",
                        help="files that are not UTF-8: fail (default) or skip and list them")
    parser.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto", help="token dtype on disk")
    parser.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of text")
    parser.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    parser.add_argument("--fim-rate", type=float, default=0.0,
                        help="share of training documents in fill-in-the-middle form (default 0; needs --split documents)")
    parser.add_argument("--fim-spm-rate", type=float, default=0.5, help="share of FIM documents in SPM order (default 0.5)")
    parser.add_argument("--fim-seed", type=int, default=0, help="seed of the FIM draws (default 0)")
    parser.add_argument("--fim-piece-chars", type=int, default=0, metavar="N",
                        help="draw FIM per piece of at most N characters cut at line ends, not per document "
                             "(context-level FIM, for windows shorter than files; default 0: whole documents)")
    parser.add_argument("--fim-line-rate", type=float, default=0.0,
                        help="share of FIM examples whose middle is whole lines (default 0: all cut at characters)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the inputs are unchanged")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print a JSON summary (for scripts) instead of sentences")


def run(args: argparse.Namespace) -> int:
    from ..data.corpus import Selection
    from ..data.shards import prepare_corpus

    corpus = prepare_corpus(args.sources, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                            val_fraction=args.val_fraction, split=args.split, text_field=args.text_field,
                            on_decode_error=args.on_decode_error, dtype=args.dtype, max_bytes=args.max_bytes,
                            shard_tokens=args.shard_tokens, force=args.force, progress=not args.no_progress,
                            fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate, fim_seed=args.fim_seed,
                            fim_piece_chars=args.fim_piece_chars, fim_line_rate=args.fim_line_rate)
    m = corpus.manifest
    if args.json:
        print(json.dumps({"out": str(corpus.directory), "documents": m["documents"], "tokens": m["num_tokens"],
                          "train_tokens": m["split_tokens"]["train"], "val_tokens": m["split_tokens"]["val"],
                          "vocab_size": m["vocab_size"], "dtype": m["dtype"], "skipped": m["skipped"],
                          "selection": m.get("selection", [])}))
    else:
        for selection in m.get("selection", []):  # curated sources (stdlib): what went in, what did not, why
            print(Selection(**selection).summary())
        print(describe_prepared(corpus.directory, m))
    return 0


def describe_prepared(directory: Path, manifest: dict[str, Any]) -> str:
    """What `prepare` made and what to run next, as sentences with the paths."""
    m, out = manifest, Path(directory)
    documents = f"{m['documents']:,} document{'s' if m['documents'] != 1 else ''}"
    lines = [f"Prepared {documents} as {m['num_tokens']:,} tokens: {m['split_tokens']['train']:,} for training "
             f"and {m['split_tokens']['val']:,} for validation."]
    shards = len(m["shards"])
    lines.append(f"  token shards: {shards} file{'s' if shards != 1 else ''} ({m['dtype']}) in {out}, "
                 f"listed in {out / 'manifest.json'}")
    kind = TOKENIZER_KINDS.get(m["tokenizer"]["kind"], m["tokenizer"]["kind"])
    lines.append(f"  tokenizer:    {out / m['tokenizer']['dir']} ({kind}, {m['vocab_size']:,} tokens)")
    fim = m.get("fim") or {}
    if fim.get("rate"):
        what = (f"pieces of at most {fim['piece_chars']:,} characters" if fim.get("piece_chars")
                else "documents")
        lines.append(f"  FIM:          {fim['documents']:,} training {what} in fill-in-the-middle form "
                     f"(rate {fim['rate']}, SPM share {fim['spm_rate']}, seed {fim['seed']})")
    if m["skipped"]:
        lines.append(f"  skipped:      {len(m['skipped'])} file(s) that are not UTF-8, e.g. {m['skipped'][0]}")
    lines.append(f"Next, pretrain on it with a recipe (see docs/pretrain.md) whose data section reads it:\n"
                 f"  gptforge pretrain --config RECIPE.yaml --data.dir={out}")
    return "\n".join(lines)
