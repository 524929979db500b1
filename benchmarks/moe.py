"""Mixture-of-experts decode and prefill speed: `gptforge.generate` against `transformers` `generate` on the
same random Mixtral-shaped weights, in the same run, and where the time goes in each.

A small Mixtral-shaped model (8 experts, top-2, GQA) is built with `transformers`, saved once and loaded by
both libraries (fp32). Decode tokens/s = N tokens / (time of generating N+1 tokens - time of generating 1);
prefill tokens/s = prompt tokens / time of generating 1 token after that prompt. The profile times each
module with forward hooks over a few decode steps and one prefill: attention, the MoE layer split into
router, expert MLPs and dispatch (the rest of the MoE layer: top-k, grouping tokens by expert, gathering
and scattering), and everything else. Prints one JSON object.

    python benchmarks/moe.py                     # the full comparison (a few minutes on 2 cores)
    python benchmarks/moe.py --hidden 128 --layers 2 --new-tokens 8 --prompt-tokens 64 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from decode import best_times_alternating, hf_greedy  # same timing rule as benchmarks/decode.py


def figure(ours: float, theirs: float) -> dict[str, float]:
    return {"gptforge_tok_s": round(ours, 2), "transformers_tok_s": round(theirs, 2), "ratio": round(ours / theirs, 3)}


@contextmanager
def module_timer(parts: dict[str, list[torch.nn.Module]]) -> Iterator[dict[str, float]]:
    """Seconds spent inside the modules of each named part (forward pre/post hooks; CPU ops are synchronous)."""
    totals: dict[str, float] = defaultdict(float)
    handles = []
    for part, modules in parts.items():
        for module in modules:
            def pre(_m, _i, part=part, module=module):
                module._bench_start = time.perf_counter()

            def post(_m, _i, _o, part=part, module=module):
                totals[part] += time.perf_counter() - module._bench_start
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def breakdown(run: Callable[[], None], parts: dict[str, list[torch.nn.Module]]) -> dict[str, float]:
    """Share of the wall time of `run` per part; "moe_dispatch" = MoE layer - router - experts."""
    with module_timer(parts) as totals:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    moe = totals.pop("moe_layer")
    totals["moe_dispatch"] = moe - totals["router"] - totals["experts"]
    totals["other"] = wall - moe - totals["attention"]
    return {"wall_s": round(wall, 4), **{k: round(v / wall, 3) for k, v in sorted(totals.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for the prefill figure")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers

    from gptforge.generate import generate, prepare_for_decoding
    from gptforge.loading import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    d = args.hidden
    config = transformers.MixtralConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=2 * d,
                                        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                                        max_position_embeddings=2048, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.MixtralForCausalLM(config).save_pretrained(tmp)
        ours = prepare_for_decoding(load_model(tmp).eval())  # as `gptforge generate` loads it
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    n = args.new_tokens

    def ours_run(prompts: torch.Tensor, new: int) -> None:
        generate(ours, prompts.tolist(), max_new_tokens=new, eos_token_id=[])

    def hf_run(prompts: torch.Tensor, new: int) -> None:
        hf_greedy(hf, prompts, new)

    def paired(ours_fn: Callable[[], None], hf_fn: Callable[[], None]) -> tuple[float, float]:
        return best_times_alternating(ours_fn, hf_fn, args.repeats)

    def decode_rates(batch: int) -> dict[str, float]:
        prompts = torch.randint(0, args.vocab, (batch, 16))
        total = paired(lambda: ours_run(prompts, n + 1), lambda: hf_run(prompts, n + 1))
        prefill = paired(lambda: ours_run(prompts, 1), lambda: hf_run(prompts, 1))
        return figure(*(batch * n / max(t - p, 1e-9) for t, p in zip(total, prefill)))

    prompt = torch.randint(0, args.vocab, (1, args.prompt_tokens))
    results: dict[str, object] = {
        "benchmark": "moe", "params": ours.num_params(), "active_params": ours.config.num_params(active=True),
        "experts": args.experts, "top_k": args.top_k, "hidden": d, "layers": args.layers, "dtype": "float32",
        "threads": args.threads, "new_tokens": n, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    results["decode_batch1"] = decode_rates(1)
    results["decode_batch8"] = decode_rates(8)
    results["prefill"] = {"prompt_tokens": args.prompt_tokens,
                          **figure(*(args.prompt_tokens / t for t in paired(lambda: ours_run(prompt, 1),
                                                                             lambda: hf_run(prompt, 1))))}
    ours_parts = {"attention": [b.attn for b in ours.blocks], "moe_layer": [b.mlp for b in ours.blocks],
                  "router": [b.mlp.router for b in ours.blocks],
                  "experts": [e for b in ours.blocks for e in b.mlp.experts]}
    hf_layers = hf.model.layers
    hf_parts = {"attention": [layer.self_attn for layer in hf_layers], "moe_layer": [layer.mlp for layer in hf_layers],
                "router": [layer.mlp.gate for layer in hf_layers], "experts": [layer.mlp.experts for layer in hf_layers]}
    short = torch.randint(0, args.vocab, (1, 16))
    results["profile"] = {
        "gptforge_decode": breakdown(lambda: ours_run(short, n + 1), ours_parts),
        "transformers_decode": breakdown(lambda: hf_run(short, n + 1), hf_parts),
        "gptforge_prefill": breakdown(lambda: ours_run(prompt, 1), ours_parts),
        "transformers_prefill": breakdown(lambda: hf_run(prompt, 1), hf_parts),
    }
    results["load_avg_before"] = [round(x, 2) for x in load_before]
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
