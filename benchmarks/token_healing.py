"""Token healing's gain: finishing a line cut in the middle of a token, with and without healing.

Prompts that end where the tokenizer would not cut (half a name, `return ` with its space, an operator
without its right side) put a model at a token boundary it never saw in training. This takes the
held-out Python lines of `gptforge.eval.heldout` (code no training corpus contains), cuts each target line
at a character position inside one of its tokens, and asks the model (greedy) to finish the line. It
prints, for healing off and on, the share of lines finished exactly (the rest of the line, up to its
newline) and the share whose first generated character is right, on the same prompts in the same run.

    python benchmarks/token_healing.py --model runs/demo/model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time


def cut_point(tokenizer, line: str, salt: str) -> int | None:
    """A character offset strictly inside a token of `line` (None when every token is one character)."""
    ids = tokenizer.encode(line, add_special_tokens=False)
    ends, offset = [], 0
    for i in ids:  # token boundaries as character offsets
        offset += len(tokenizer.decode([i]))
        ends.append(offset)
    inside = [k for k in range(2, len(line) - 2) if k not in ends]
    if not inside:
        return None
    pick = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "big")
    return inside[pick % len(inside)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a gptforge model folder (e.g. runs/demo/model)")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--context-chars", type=int, default=300, help="file text kept before the cut line")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from gptforge.eval.heldout import load_heldout_python, next_line_examples
    from gptforge.generate import generate
    from gptforge.loading import load

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    examples = next_line_examples(load_heldout_python(), max_lines=args.lines)
    prompts, rests = [], []
    for ex in examples:
        k = cut_point(tokenizer, ex.target, f"{ex.path}:{ex.target}")
        if k is None:
            continue
        prompts.append((ex.prompt + "\n")[-args.context_chars:] + ex.target[:k])
        rests.append(ex.target[k:])
    load_before = os.getloadavg()[0]
    results = {}
    for healing in (False, True):
        started = time.perf_counter()
        outs = generate(model, prompts, tokenizer, max_new_tokens=args.max_new_tokens, do_sample=False,
                        truncate_prompt=True, token_healing=healing)
        lines = [o.text.split("\n")[0].rstrip() for o in outs]
        results["healing" if healing else "plain"] = {
            "rest_of_line_exact": round(sum(a == b for a, b in zip(lines, rests)) / len(rests), 4),
            "first_char_right": round(sum(a[:1] == b[:1] for a, b in zip(lines, rests)) / len(rests), 4),
            "seconds": round(time.perf_counter() - started, 1)}
    plain, healed = results["plain"]["rest_of_line_exact"], results["healing"]["rest_of_line_exact"]
    print(json.dumps({"model": args.model, "prompts": len(prompts), **results,
                      "exact_ratio": round(healed / plain, 2) if plain else None,
                      "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}, indent=2))


if __name__ == "__main__":
    main()
