"""Prompt-lookup speculative decoding: batch-1 greedy tokens/s with and without it, against transformers, same run.

Code-editing prompts, taken from the running Python's standard library (no download):
- "edit": a function, then the start of the same function with one name changed, to be continued;
- "continue": the start of a file that repeats its identifiers (`stat.py`), to be continued.
Both libraries decode the same token ids greedily with the same weights (the gptforge model folder is
loaded by `transformers.AutoModelForCausalLM` as saved; `OMP_WAIT_POLICY=PASSIVE`, as the CLI sets it),
plain and with prompt lookup (`prompt_lookup_num_tokens`, `max_matching_ngram_size`), timed alternately so
that both see the same machine load. Decode tokens/s = (N - 1) / (time of generating N tokens - time of
generating 1), so the prefill is excluded. Acceptance rate = drafted tokens the model kept / drafted tokens
(ours). Prints one JSON object.

A random-init model never repeats its context, so the model must have learnt to copy, e.g. the small
code model of `gptforge pretrain --config configs/stdlib-code.yaml` (its `best` folder):

    python benchmarks/prompt_lookup.py --model runs/stdlib-code/best
    python benchmarks/prompt_lookup.py --model runs/stdlib-code/best --new-tokens 16 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sysconfig
import time
from pathlib import Path
from typing import Callable

from gptforge.commands.decoding_args import passive_openmp

passive_openmp()  # as `gptforge generate` does, for both libraries: spinning OpenMP workers ruin a loaded host
import torch  # noqa: E402  (after the OpenMP setting, which libgomp reads once)


def code_prompts(tokenizer, budget: int) -> dict[str, list[int]]:
    """The two code-editing prompts as token ids, each at most `budget` tokens.

    The edit prompt takes the longest of a few stdlib functions whose source and edited start fit the
    budget whole (a small model's context holds only a short function; cut, the original is lost)."""
    import calendar
    import fnmatch
    import re
    import shlex
    import textwrap

    candidates = [(inspect.getsource(textwrap.TextWrapper._split_chunks)
                   + inspect.getsource(textwrap.TextWrapper._split), "text", "string"),
                  (inspect.getsource(fnmatch.filter), r"\bnames\b", "files"),
                  (inspect.getsource(shlex.quote), r"\bs\b", "text"),
                  (inspect.getsource(calendar.leapdays), r"\by1\b", "first"),
                  (inspect.getsource(calendar.isleap), r"\byear\b", "y")]
    for source, old, new in candidates:
        edited = re.sub(old, new, source)
        edit = tokenizer.encode(source + "\n\n" + edited[:edited.index("\n", 40) + 1])
        if len(edit) <= budget:
            break
    stat = (Path(sysconfig.get_paths()["stdlib"]) / "stat.py").read_text(encoding="utf-8")
    start = stat.index("def S_ISDIR")
    prompts = {"edit": edit, "continue": tokenizer.encode(stat[start - 400:start + 300])}
    return {name: ids[-budget:] for name, ids in prompts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a gptforge model folder that has learnt to copy code")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens (transformers' usual 10)")
    parser.add_argument("--ngram", type=int, default=2, help="max_matching_ngram_size")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import transformers

    from gptforge.generate import generate, prepare_for_decoding
    from gptforge.loading import load

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ours, tokenizer = load(Path(args.model))
    ours = prepare_for_decoding(ours.eval())
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    n = args.new_tokens
    prompts = code_prompts(tokenizer, ours.config.block_size - n - 1)
    lookup = dict(prompt_lookup_num_tokens=args.lookup, max_matching_ngram_size=args.ngram)

    def ours_run(ids: list[int], new: int, spec: bool) -> object:
        return generate(ours, ids, max_new_tokens=new, eos_token_id=[], compile=False, **(lookup if spec else {}))[0]

    def hf_run(ids: list[int], new: int, spec: bool) -> list[int]:
        prompt = torch.tensor([ids])
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **(lookup if spec else {}))
        return out[0, len(ids):].tolist()

    def best(fns: list[Callable[[], object]]) -> list[float]:
        """Best time of each function, run alternately so that all see the same load (after one warm-up)."""
        for fn in fns:
            fn()
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(args.repeats):
            for fn, slot in zip(fns, times):
                start = time.perf_counter()
                fn()
                slot.append(time.perf_counter() - start)
        return [min(t) for t in times]

    results: dict[str, object] = {
        "benchmark": "prompt_lookup", "model": args.model, "params": ours.num_params(), "dtype": "float32",
        "threads": args.threads, "new_tokens": n, "prompt_lookup_num_tokens": args.lookup,
        "max_matching_ngram_size": args.ngram, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    for name, ids in prompts.items():
        plain, fast = ours_run(ids, n, False), ours_run(ids, n, True)
        hf_plain, hf_fast = hf_run(ids, n, False), hf_run(ids, n, True)
        variants = [(ours_run, False), (ours_run, True), (hf_run, False), (hf_run, True)]
        totals = best([lambda f=f, s=s: f(ids, n, s) for f, s in variants])
        prefills = best([lambda f=f, s=s: f(ids, 1, s) for f, s in variants])
        if any(t <= p for t, p in zip(totals, prefills)):
            raise SystemExit(f"{name}: a run of {n} tokens was not slower than one of 1 token (too noisy a machine, "
                             "or too few --new-tokens); rerun with more --new-tokens or --repeats")
        rates = [(n - 1) / (t - p) for t, p in zip(totals, prefills)]
        results[name] = {
            "prompt_tokens": len(ids),
            "gptforge": {"plain_tok_s": round(rates[0], 1), "lookup_tok_s": round(rates[1], 1),
                         "speedup": round(rates[1] / rates[0], 2),
                         "acceptance_rate": round(fast.accepted_draft_tokens / max(fast.draft_tokens, 1), 3),
                         "tokens_per_pass": round(len(fast.token_ids) / max(len(fast.token_ids)
                                                                            - fast.accepted_draft_tokens, 1), 2),
                         "identical_to_plain": fast.token_ids == plain.token_ids},
            "transformers": {"plain_tok_s": round(rates[2], 1), "lookup_tok_s": round(rates[3], 1),
                             "speedup": round(rates[3] / rates[2], 2), "identical_to_plain": hf_fast == hf_plain},
            "same_tokens_as_transformers": plain.token_ids == hf_plain,
            "ratio_lookup_tok_s": round(rates[1] / rates[3], 3),
        }
    results["load_avg_before"] = [round(x, 2) for x in load_before]
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
