"""Evaluation throughput: gptforge's lm-eval adapter against lm-eval's own Hugging Face backend (HFLM).

Both score the same requests on the same weights (our model directory loaded by `transformers` as a
GPT2LMHeadModel), through lm-eval's `loglikelihood` (multiple-choice style: a shared context, short
continuations) and `loglikelihood_rolling` (perplexity of long documents). The figures are scored
tokens per second; the answers are compared too (max |delta log-likelihood|, greedy flags).
Random-init weights: speed does not depend on the values.

    python benchmarks/eval.py                 # 6-layer 384-wide model, 8k vocab (a few minutes on 2 cores)
    python benchmarks/eval.py --gpt2          # GPT-2-124M-shaped model (slow on CPU)
    python benchmarks/eval.py --quick         # tiny model, few requests (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from gptforge import GPT, Tokenizer
from gptforge.loading import save  # noqa: E402


SIZES = {
    "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=512),
}


def build_model(directory: Path, size: str) -> None:
    words = ("the cat dog sat on mat log capital of France Italy two plus four question answer colour sky "
             "green blue tree bird sang river stone king queen castle garden window door").split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(40)) + "." for _ in range(400)]
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=512 if size == "quick" else 8192)
    torch.manual_seed(0)
    model = GPT.from_config("gpt2", vocab_size=tokenizer.vocab_size, **SIZES[size])
    save(directory, model, tokenizer)


def requests(n_questions: int, n_docs: int, doc_words: int):
    from lm_eval.api.instance import Instance

    rng = random.Random(1)
    words = "the cat dog sat on mat log capital of France Italy two plus four sky green blue tree bird".split()
    ll, rolling = [], []
    for q in range(n_questions):
        context = "Question: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "\nAnswer:"
        for _ in range(4):
            choice = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            ll.append(Instance("loglikelihood", {}, (context, choice), q))
    for d in range(n_docs):
        text = " ".join(rng.choice(words) for _ in range(doc_words))
        rolling.append(Instance("loglikelihood_rolling", {}, (text,), d))
    return ll, rolling


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args, disable_tqdm=True)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests")
    parser.add_argument("--gpt2", action="store_true", help="GPT-2-124M-shaped model")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    import transformers
    from lm_eval.models.huggingface import HFLM

    from gptforge.eval.harness import GPTForgeLM

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        size = "quick" if args.quick else "gpt2" if args.gpt2 else "small"
        build_model(directory, size)
        ours = GPTForgeLM(str(directory), batch_size=args.batch_size, device="cpu")
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.tokenizer.backend,
                                                            eos_token="<|endoftext|>", pad_token="<|pad|>")
        peer = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=args.batch_size,
                    max_length=ours.max_length, device="cpu")
        ll, rolling = requests(*((8, 2, 300) if args.quick else (32, 4, 800)))
        figures = {}
        for name, method, reqs in (("loglikelihood", "loglikelihood", ll),
                                   ("loglikelihood_rolling", "loglikelihood_rolling", rolling)):
            getattr(ours, method)(reqs[:2], disable_tqdm=True)  # warm-up
            getattr(peer, method)(reqs[:2], disable_tqdm=True)
            # Alternate twice so a load change hits both sides alike; keep the best time of each.
            runs = {"gptforge": [], "lm_eval_hflm": []}
            for _ in range(2):
                ours_out, t_ours = timed(getattr(ours, method), reqs)
                peer_out, t_peer = timed(getattr(peer, method), reqs)
                runs["gptforge"].append(t_ours)
                runs["lm_eval_hflm"].append(t_peer)
            if method == "loglikelihood":
                tokens = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in reqs)
                delta = max(abs(a[0] - b[0]) for a, b in zip(ours_out, peer_out))
                greedy_equal = all(a[1] == b[1] for a, b in zip(ours_out, peer_out))
            else:
                tokens = sum(len(ours.tok_encode(r.args[0])) for r in reqs)
                delta = max(abs(a - b) for a, b in zip(ours_out, peer_out))
                greedy_equal = None
            t_ours, t_peer = min(runs["gptforge"]), min(runs["lm_eval_hflm"])
            figures[name] = {"requests": len(reqs), "tokens": tokens,
                             "gptforge_tokens_per_s": round(tokens / t_ours, 1),
                             "lm_eval_hflm_tokens_per_s": round(tokens / t_peer, 1),
                             "ratio": round(t_peer / t_ours, 3), "max_abs_loglik_delta": delta,
                             "greedy_flags_equal": greedy_equal}
    print(json.dumps({"benchmark": "eval", "model": f"{size}: {SIZES[size]} (random init)",
                      "batch_size": args.batch_size, "device": "cpu", "threads": torch.get_num_threads(),
                      "loadavg": os.getloadavg(), "results": figures,
                      "date": time.strftime("%Y-%m-%d", time.gmtime())}, indent=2))


if __name__ == "__main__":
    main()
