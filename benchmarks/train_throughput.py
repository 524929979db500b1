"""Training throughput: gptforge vs Hugging Face `transformers` GPT2LMHeadModel, same shapes, same run.

Both sides train the same GPT-2 architecture (same layers, widths, vocabulary, context, batch, threads)
on the same random batches with AdamW. The peer runs as the HF Trainer would on this machine: eager
fp32 with torch's fused AdamW (Trainer's default optimizer since torch 2.8). gptforge runs its training
step (`gptforge.train.loop`): fused AdamW without decay on norms/biases/embeddings, SDPA attention,
bf16 autocast and torch.compile when they are faster on this machine (each variant is measured and
reported; `--headline` picks the one quoted, bf16 eager by default). The peer is also timed with bf16
autocast for a same-precision ratio. Single timed steps alternate between all variants; medians are reported.

    python benchmarks/train_throughput.py [--threads 2] [--steps 12] [--layers 4 --dim 256 ...]
Prints one JSON object: tokens/s of each side, their ratio, the variant table and the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (steps x rounds single steps per variant)")
    ap.add_argument("--variants", default="fp32,bf16,compile-fp32,compile-bf16",
                    help="gptforge variants to measure")
    ap.add_argument("--headline", default="bf16",
                    help="the gptforge variant reported as gptforge's figure (a fixed choice, not the luckiest)")
    return ap.parse_args()


def make_gptforge(args: argparse.Namespace, variant: str):
    from gptforge.config import Config
    from gptforge.model import GPT
    from gptforge.train.optim import build_optimizer

    torch.manual_seed(0)
    config = Config(family="gpt2", vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers,
                    n_head=args.heads, n_embd=args.dim)
    model = GPT(config).train()
    optimizer = build_optimizer(model, lr=3e-4)
    forward = torch.compile(model) if variant.startswith("compile") else model
    amp = variant.endswith("bf16")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, model.num_params()


def make_hf(args: argparse.Namespace, bf16: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.dim, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        # HF shifts internally: pass the full window as input_ids and labels.
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    n = sum(p.numel() for p in model.parameters())
    return step, n, model.config._attn_implementation


def time_steps(step, batches, n: int) -> float:
    """Seconds per step over `n` steps (after the batches were warmed up by the caller)."""
    start = time.perf_counter()
    for i in range(n):
        x, y = batches[i % len(batches)]
        step(x, y)
    return (time.perf_counter() - start) / n


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        rows = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        batches.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    tokens = args.batch * args.seq

    hf_step, hf_params, hf_attn = make_hf(args)
    hf_bf16_step = make_hf(args, bf16=True)[0]
    variants = args.variants.split(",")
    if args.headline not in variants:
        variants.append(args.headline)
    ours = {v: make_gptforge(args, v) for v in variants}
    ours_params = next(iter(ours.values()))[1]
    steps = {"hf": hf_step, "hf-bf16": hf_bf16_step, **{v: step for v, (step, _) in ours.items()}}
    # Warm-up: compilation and allocator caches stay out of the timings.
    for _ in range(3):
        for step in steps.values():
            step(*batches[0])

    # Interleave single steps (A, B, C, A, B, C, ...) and take medians: load spikes on a shared machine
    # then hit every side alike and drop out of the median.
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.rounds * args.steps):
        for k, step in steps.items():
            times[k].append(time_steps(step, batches[i % len(batches):], 1))
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    best = args.headline
    result = {
        "benchmark": "train_throughput",
        "shapes": {"layers": args.layers, "dim": args.dim, "heads": args.heads, "vocab": args.vocab,
                   "seq": args.seq, "batch": args.batch, "threads": args.threads},
        "params": {"gptforge": ours_params, "transformers": hf_params},
        "gptforge_tokens_per_s": round(tps[best], 1),
        "gptforge_variant": best,
        "transformers_tokens_per_s": round(tps["hf"], 1),
        "transformers_setup": f"GPT2LMHeadModel eager fp32, attn_implementation={hf_attn}, fused AdamW",
        "ratio": round(tps[best] / tps["hf"], 3),
        "ratio_same_precision": {"fp32": round(tps.get("fp32", float("nan")) / tps["hf"], 3),
                                 "bf16": round(tps.get("bf16", float("nan")) / tps["hf-bf16"], 3)},
        "variants_tokens_per_s": {**{v: round(tps[v], 1) for v in ours},
                                  "transformers-bf16": round(tps["hf-bf16"], 1)},
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
