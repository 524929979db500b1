"""Sampling settings for a small code model: which ones keep completions out of loops without losing accuracy.

For each setting, completes held-out Python prompts (`gptforge.eval.heldout`: the file up to the end of
a line, in no training corpus) and the demo's own prompts, with several seeds, and reports
  * loop rate: share of completions that are degenerate (`gptforge.eval.heldout.is_degenerate`), next to
    the rate of the real text that follows the same prompts (the peer: what ordinary code scores);
  * next-line exact match of the sampled continuation (greedy is the ceiling a sampler trades away);
  * whether the demo's prompts looped.

    python benchmarks/sampling_settings.py --model runs/demo/model [--prompts 80] [--seeds 3]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

SETTINGS = {
    "greedy": {"do_sample": False},
    "t1.0": {"do_sample": True, "temperature": 1.0},
    "t0.7-k40 (old demo)": {"do_sample": True, "temperature": 0.7, "top_k": 40},
    "t0.8-p0.95": {"do_sample": True, "temperature": 0.8, "top_p": 0.95},
    "t0.7-minp0.1": {"do_sample": True, "temperature": 0.7, "min_p": 0.1},
    "t0.7-k40-rep1.1": {"do_sample": True, "temperature": 0.7, "top_k": 40, "repetition_penalty": 1.1},
    "t0.7-k40-rep1.2": {"do_sample": True, "temperature": 0.7, "top_k": 40, "repetition_penalty": 1.2},
    "t0.7-k40-norep4": {"do_sample": True, "temperature": 0.7, "top_k": 40, "no_repeat_ngram_size": 4},
    "t0.5-k40-rep1.1": {"do_sample": True, "temperature": 0.5, "top_k": 40, "repetition_penalty": 1.1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=80, help="held-out prompts")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated setting names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gptforge.demo import DEFAULT_PROMPTS
    from gptforge.eval.heldout import (encode_prompt, is_degenerate, load_heldout_python, next_line_examples,
                                       predicted_line)
    from gptforge.generate import generate
    from gptforge.loading import load

    model, tokenizer = load(args.model)
    examples = next_line_examples(load_heldout_python(), args.prompts)
    keep = model.config.block_size - args.max_new_tokens
    prompts = [encode_prompt(tokenizer, e.prompt, keep) for e in examples]
    demo = [tokenizer.encode(p) for p in DEFAULT_PROMPTS]
    # The peer: the real text after each prompt, as long as a completion, through the same loop test.
    sample = load_heldout_python()
    texts = {(c.package, c.path): c.before + c.text for c in sample.chunks}
    real = []
    for e in examples:
        full = texts[(e.package, e.path)]
        after = full[full.index(e.prompt) + len(e.prompt):] if e.prompt in full else ""
        real.append(tokenizer.decode(tokenizer.encode(after, add_special_tokens=False)[:args.max_new_tokens]))
    result = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"), "load": round(os.getloadavg()[0], 2),
              "prompts": len(examples), "seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
              "real_text_loop_rate": sum(map(is_degenerate, real)) / len(real), "settings": {}}
    names = args.only.split(",") if args.only else list(SETTINGS)
    for name in names:
        params = SETTINGS[name]
        seeds = range(args.seeds) if params["do_sample"] else range(1)
        loops = hits = total = demo_loops = demo_total = 0
        for seed in seeds:
            outs = generate(model, prompts + demo, tokenizer, max_new_tokens=args.max_new_tokens, seed=seed, **params)
            for e, out in zip(examples, outs[:len(examples)]):
                loops += is_degenerate(out.text)
                hits += predicted_line(out.text, out.finish_reason == "stop") == e.target
                total += 1
            for out in outs[len(examples):]:
                demo_loops += is_degenerate(out.text)
                demo_total += 1
        result["settings"][name] = {"params": params, "loop_rate": round(loops / total, 3),
                                    "next_line_em": round(hits / total, 3),
                                    "demo_prompt_loop_rate": round(demo_loops / demo_total, 3)}
        print(name, result["settings"][name], file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
