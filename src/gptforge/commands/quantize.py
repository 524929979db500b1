"""`gptforge quantize`: weight-only int8 (per channel) or int4 (group-wise) for fast CPU decoding."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    parser.add_argument("--method", required=True, help="int8 (per-channel) or int4 (group-wise)")
    parser.add_argument("--out", required=True, help="output directory for the quantized model")
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size, a multiple of 32 (default 32)")
    parser.add_argument("--dynamic-activations", action="store_true",
                        help="int8 only: quantize activations per token at prefill (int8 x int8 matmul)")
    parser.add_argument("--keep-lm-head", action="store_true", help="leave the output projection unquantized")


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_directory
    from ..compress.quantize import METHODS, quantization_config, quantize_model
    from ..formatting import human_bytes
    from ..loading import load, save

    if args.method not in METHODS:
        raise ValueError(f"--method: unknown quantization method {args.method!r}; expected one of {list(METHODS)}")
    quantization_config(args.method, args.group_size, args.dynamic_activations)  # validates before loading
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError("--out must differ from --model (the float model would be overwritten)")
    model, tokenizer = load(args.model)
    quantize_model(model, args.method, group_size=args.group_size, dynamic_activations=args.dynamic_activations,
                   include_head=not args.keep_lm_head)
    with atomic_directory(args.out) as tmp:
        save(tmp, model, tokenizer)
    before, after = weights_file_bytes(Path(args.model)), weights_file_bytes(Path(args.out))
    print(f"Quantized {args.model} to {args.method} in {args.out}: weights {human_bytes(before)} -> "
          f"{human_bytes(after)} on disk ({before / max(after, 1):.1f}x smaller).")
    return 0


def weights_file_bytes(directory: Path) -> int:
    """Bytes of a model directory's safetensors files (one file or shards): what the weights take on disk."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))
