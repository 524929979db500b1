"""`gptforge explain`: per-token log-probabilities, surprisal, alternatives and attention maps of a text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors + tokenizer)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to explain")
    source.add_argument("--file", help="read the text from this file (UTF-8)")
    parser.add_argument("--out", default="explain", help="output folder for index.html, PNGs and JSON "
                        "(default: ./explain)")
    parser.add_argument("--top-k", type=int, default=5, help="alternatives shown per position (default 5)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="refuse texts longer than this many tokens; attention grows as tokens^2 (default 256)")
    parser.add_argument("--no-attention", action="store_true", help="skip attention maps (log-probs only)")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..explain import explain, format_table, write_report
    from ..loading import load

    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"--file: no such file: {path}")
        text = path.read_text(encoding="utf-8")
    else:
        text = args.text
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer.json in the model directory; explain needs one")
    explanation = explain(model, text, tokenizer, top_k=args.top_k, attention=not args.no_attention,
                          max_tokens=args.max_tokens)
    written = write_report(explanation, args.out)
    if args.json:
        print(json.dumps(explanation.to_dict(include_attention=False), indent=1))
    else:
        print(format_table(explanation))
        maps = len(written["attention_png"])
        print(f"Wrote the report to {written['html']} (open it in a browser), the numbers to {written['json']}"
              + (f", and {maps} attention map{'s' if maps != 1 else ''} (one PNG per layer) to "
                 f"{Path(args.out) / 'attention'}." if maps else "."))
    return 0
