"""Decode and prefill speed of `gptforge.generate` against `transformers` `generate`, same weights, same run.

A GPT-2 124M-shaped model with random weights (fp32) is saved once in HF format and loaded by both
libraries. Decode tokens/s = N tokens / (time of generating N+1 tokens - time of generating 1), so the
prefill is excluded; prefill tokens/s = prompt tokens / time of generating 1 token after that prompt.
The memory-bandwidth bound is copy bandwidth / weight bytes per token: each decoded token streams
every weight once. Prints one JSON object.

    python benchmarks/decode.py                 # the full comparison (a few minutes on 2 cores)
    python benchmarks/decode.py --compile       # also the torch.compile'd decode step
    python benchmarks/decode.py --preset nano --new-tokens 8 --prompt-tokens 32   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any, Callable

import torch


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` runs (after one warm-up): the least disturbed by other processes."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds


def figure(ours: float, theirs: float) -> dict[str, float]:
    return {"gptforge_tok_s": round(ours, 2), "transformers_tok_s": round(theirs, 2), "ratio": round(ours / theirs, 3)}


def hf_greedy(hf: Any, prompts: torch.Tensor, new: int) -> None:
    """transformers' greedy `generate` of exactly `new` tokens (no early EOS), the peer's side of a timing."""
    with torch.inference_mode():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False)


def best_times_alternating(ours_fn: Callable[[], None], theirs_fn: Callable[[], None],
                           repeats: int) -> tuple[float, float]:
    """Best times of both sides after a warm-up, measured alternately so that both see the same machine load."""
    ours_fn()
    theirs_fn()
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours_fn, ours_times), (theirs_fn, theirs_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(ours_times), min(theirs_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", help="gptforge config preset (default: gpt2, 124M)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the prefill figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    args = parser.parse_args()

    import transformers

    from gptforge.config import Config
    from gptforge.generate import generate, prepare_for_decoding
    from gptforge.loading import load_model, save
    from gptforge.model import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    config = Config.from_name(args.preset)
    model = GPT(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp, model)
        ours = prepare_for_decoding(load_model(tmp).eval())  # as `gptforge generate` loads it
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    del model
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    vocab = config.vocab_size
    n = args.new_tokens

    def ours_run(prompts: torch.Tensor, new: int, compile: bool = False) -> None:
        generate(ours, prompts.tolist(), max_new_tokens=new, eos_token_id=[], compile=compile)

    def hf_run(prompts: torch.Tensor, new: int) -> None:
        hf_greedy(hf, prompts, new)

    def paired(ours_fn: Callable[[], None], hf_fn: Callable[[], None]) -> tuple[float, float]:
        return best_times_alternating(ours_fn, hf_fn, args.repeats)

    def decode_rates(batch: int) -> dict[str, float]:
        prompts = torch.randint(0, vocab, (batch, 16))
        total = paired(lambda: ours_run(prompts, n + 1), lambda: hf_run(prompts, n + 1))
        prefill = paired(lambda: ours_run(prompts, 1), lambda: hf_run(prompts, 1))
        return figure(*(batch * n / max(t - p, 1e-9) for t, p in zip(total, prefill)))

    def prefill_rates() -> dict[str, float]:
        prompt = torch.randint(0, vocab, (1, args.prompt_tokens))
        return figure(*(args.prompt_tokens / t for t in paired(lambda: ours_run(prompt, 1),
                                                                lambda: hf_run(prompt, 1))))

    results: dict[str, object] = {
        "benchmark": "decode", "preset": args.preset, "params": ours.num_params(), "dtype": "float32",
        "threads": args.threads, "new_tokens": n, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    results["decode_batch1"] = decode_rates(1)
    results["decode_batch8"] = decode_rates(8)
    results["prefill"] = {"prompt_tokens": args.prompt_tokens, **prefill_rates()}
    best_b1 = results["decode_batch1"]["gptforge_tok_s"]
    if args.compile:
        start = time.perf_counter()
        ours_run(torch.randint(0, vocab, (1, 16)), n + 1, compile=True)
        compile_s = time.perf_counter() - start
        prompts = torch.randint(0, vocab, (1, 16))
        total = best_time(lambda: ours_run(prompts, n + 1, compile=True), args.repeats)
        prefill = best_time(lambda: ours_run(prompts, 1, compile=True), args.repeats)
        compiled = n / max(total - prefill, 1e-9)
        results["decode_batch1_compiled"] = {**figure(compiled, results["decode_batch1"]["transformers_tok_s"]),
                                             "first_call_s": round(compile_s, 1)}
        best_b1 = max(best_b1, compiled)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    bandwidth = copy_bandwidth()
    bound = bandwidth / weight_bytes
    results["memory_bound"] = {
        "weight_bytes_per_token": weight_bytes, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bound_tok_s": round(bound, 2), "gptforge_batch1_fraction": round(best_b1 / bound, 3),
        "transformers_batch1_fraction": round(results["decode_batch1"]["transformers_tok_s"] / bound, 3),
    }
    results["load_avg_before"] = [round(x, 2) for x in load_before]
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
