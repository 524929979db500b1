"""`gptforge prune`: unstructured (magnitude, Wanda) or structured (heads + MLP channels) pruning."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    parser.add_argument("--sparsity", type=float, required=True,
                        help="fraction in [0, 1): of weights (magnitude, wanda) or of heads and MLP channels (heads)")
    parser.add_argument("--method", required=True, help="magnitude | wanda | heads (structured: heads + MLP channels)")
    parser.add_argument("--out", required=True, help="output directory for the pruned model")
    parser.add_argument("--calibration", help="UTF-8 text file for activation statistics (needed by wanda; "
                        "improves heads)")
    parser.add_argument("--calibration-samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (default 128)")
    parser.add_argument("--recover-steps", type=int, default=0,
                        help="optional recovery fine-tune steps on --calibration text after pruning (default 0: none)")
    parser.add_argument("--recover-lr", type=float, default=1e-4, help="recovery learning rate (default 1e-4)")


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_directory
    from ..compress.prune import PRUNE_METHODS, calibration_batches, prune_model, sparsity_of, validate_sparsity
    from ..loading import load, save

    if args.method not in PRUNE_METHODS:
        raise ValueError(f"--method: unknown pruning method {args.method!r}; expected one of {list(PRUNE_METHODS)}")
    validate_sparsity(args.sparsity)
    if args.method == "wanda" and not args.calibration:
        raise ValueError("--calibration FILE is required with --method wanda (activation norms come from it)")
    if args.recover_steps < 0:
        raise ValueError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    if args.recover_steps and not args.calibration:
        raise ValueError("--recover-steps needs --calibration FILE (the recovery fine-tune trains on that text)")
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError("--out must differ from --model (the original model would be overwritten)")
    model, tokenizer = load(args.model)
    calibration, ids = None, None
    if args.calibration:
        path = Path(args.calibration)
        if not path.is_file():
            raise FileNotFoundError(f"--calibration: no such file: {path}")
        if tokenizer is None:
            raise ValueError(f"--model {args.model}: no tokenizer.json; calibration text cannot be tokenized")
        ids = tokenizer.encode(path.read_text(encoding="utf-8"))
        calibration = calibration_batches(ids, min(args.seq_len, model.config.block_size), args.calibration_samples)
    before = model.num_params()
    pruned = prune_model(model, args.method, args.sparsity, calibration)
    if args.recover_steps:
        import tempfile

        from ..compress.prune import recover_finetune

        with tempfile.TemporaryDirectory(prefix="gptforge-recover-") as run_dir:
            recover_finetune(pruned, ids, run_dir, steps=args.recover_steps, lr=args.recover_lr,
                             seq_len=args.seq_len)
    with atomic_directory(args.out) as tmp:
        save(tmp, pruned, tokenizer)
    if args.method == "heads":
        c = pruned.config
        print(f"pruned {args.model} -> {args.out}: parameters {before:,} -> {pruned.num_params():,} "
              f"(n_head={c.n_head}, n_kv_head={c.kv_heads}, head_dim={c.hdim}, intermediate_size={c.ffn_dim})")
    else:
        print(f"pruned {args.model} -> {args.out}: {sparsity_of(pruned):.1%} of block weights are zero ({args.method})")
    return 0
