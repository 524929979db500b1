"""`gptforge export`: a model directory as a Hugging Face directory or a GGUF file (llama.cpp)."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("hf", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (float, pruned or quantized)")
    parser.add_argument("--format", required=True, help="hf (transformers directory) or gguf (one llama.cpp file)")
    parser.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    parser.add_argument("--dtype", default=None,
                        help="hf: float32 | bfloat16 | float16 (default float32); gguf: f32 | f16 | bf16 | q8_0 | q4_0 (default f32)")


def run(args: argparse.Namespace) -> int:
    from ..loading import load

    if args.format not in FORMATS:
        raise ValueError(f"--format: unknown export format {args.format!r}; expected one of {list(FORMATS)}")
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError("--out must differ from --model")
    if args.format == "gguf":
        import logging

        logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it opens at INFO
        from ..interop.gguf import GGUF_TYPES, export_gguf, gguf_architecture

        outtype = args.dtype or "f32"
        if outtype not in GGUF_TYPES:
            raise ValueError(f"--dtype: GGUF type must be one of {list(GGUF_TYPES)}, got {outtype!r}")
        model, tokenizer = load(args.model)
        gguf_architecture(model.config)
        path = export_gguf(model, args.out, tokenizer, outtype=outtype)
        print(f"exported {args.model} -> {path} (GGUF, {gguf_architecture(model.config)}, {outtype})")
        return 0
    return _export_hf(args)


def _export_hf(args: argparse.Namespace) -> int:
    import torch

    from ..atomic import atomic_directory
    from ..compress.quantize import dequantize_model
    from ..interop.hf import hf_family
    from ..loading import load, save

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    name = args.dtype or "float32"
    if name not in dtypes:
        raise ValueError(f"--dtype: HF dtype must be one of {list(dtypes)}, got {name!r}")
    model, tokenizer = load(args.model)
    family = hf_family(model.config)
    if family is None:
        raise ValueError(f"--model {args.model}: this architecture has no transformers equivalent "
                         "(e.g. sinusoidal positions, or a structurally pruned GPT-2 whose head_dim != n_embd/n_head)")
    model = dequantize_model(model, dtypes[name])  # quantized weights are expanded; float models are cast
    with atomic_directory(args.out) as tmp:
        save(tmp, model, tokenizer)
    print(f"exported {args.model} -> {args.out} (transformers {family}, {name})")
    return 0
