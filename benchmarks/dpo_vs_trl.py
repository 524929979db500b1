"""DPO training throughput: gptforge's preference step vs TRL's `DPOTrainer`, same model, pairs and run.

Both sides start from the same random-init tiny Llama (built with `transformers`, offline; gptforge
loads the saved folder) and train on the same prompt/chosen/rejected pairs, `batch` pairs a step,
tokenized identically (the byte-level BPE tokenizer is shared; tests/finetune/test_preference.py checks
the token ids agree), fp32, `threads` torch threads, sigmoid DPO with beta 0.1 against a frozen copy of
the starting model, AdamW, gradient clipping at 1.0. One step is what each trainer does per batch:
- gptforge: `PreferenceObjective.loss` (reference and policy log-probs, loss) + backward + clip + AdamW
  step, as `gptforge.train.loop.Trainer.train_step` runs it;
- TRL: `DPOTrainer.data_collator` + `DPOTrainer.compute_loss` + backward + clip + its own AdamW step
  (`create_optimizer`, the Trainer's default fused AdamW), as `Trainer.training_step` runs it on a CPU.
Timed steps alternate between the sides (after warm-up steps); the median step time of each side gives
tokens/s, counting the tokens of the chosen and rejected sequences (prompt + answer) per step.

    python benchmarks/dpo_vs_trl.py [--threads 2] [--steps 6] [--rounds 2] [--batch 8] [--dim 256 --layers 4]
Prints one JSON object: {"ours", "peer", "ratio"} in tokens/s (median over steps, ratio = ours / peer), the
same per CPU-second of the process (steadier on a shared machine), the settings and the load average.
Text: ../shared/data/tinyshakespeare.txt when present (or --text FILE), else generated sentences.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--prompt-chars", type=int, default=240)
    ap.add_argument("--answer-chars", type=int, default=200)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--text", default=None, help="a text file for the pairs (default: tinyshakespeare if present)")
    return ap.parse_args()


def corpus(path: str | None) -> str:
    """The text the pairs are cut from."""
    source = Path(path) if path else DEFAULT_TEXT
    if source.is_file():
        return source.read_text(encoding="utf-8")
    rng = random.Random(0)
    words = "the a model answer question good bad river stone light over under quick slow bright dark".split()
    return " ".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(4000))


def make_pairs(text: str, n: int, prompt_chars: int, answer_chars: int, seed: int = 0) -> list[dict]:
    """Prompt = whole lines of the text; chosen = the lines that follow; rejected = lines from elsewhere.
    Cuts fall on line ends, so no token spans the prompt/answer boundary (both sides then agree on ids)."""
    lines = [line.strip() + "\n" for line in text.splitlines() if line.strip()]
    rng = random.Random(seed)

    def take(start: int, chars: int) -> tuple[str, int]:
        out, i = "", start
        while len(out) < chars and i < len(lines):
            out, i = out + lines[i], i + 1
        return out, i

    rows = []
    for _ in range(n):
        prompt, after = take(rng.randrange(len(lines) // 2), prompt_chars)
        chosen, _ = take(after, answer_chars)
        rejected, _ = take(rng.randrange(len(lines) // 2), answer_chars)
        rows.append({"prompt": prompt, "chosen": chosen.rstrip("\n"), "rejected": rejected.rstrip("\n")})
    return rows


def build_models(args: argparse.Namespace, tokenizer, folder: Path):
    """(the HF Llama, the same weights as a gptforge model)."""
    import transformers

    from gptforge.loading import load_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.dim,
                                   intermediate_size=args.dim * 8 // 3 // 8 * 8, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
                                   max_position_embeddings=1024, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    hf.save_pretrained(folder)
    ours = load_model(folder)
    return hf, ours


class OursStep:
    """gptforge's DPO step (the loop's train_step without the distributed no-ops)."""

    def __init__(self, model, tokenizer, rows: list[dict], batch: int) -> None:
        from gptforge.data.preference import collate_pairs, encode_pair
        from gptforge.data.records import Record
        from gptforge.finetune.preference import PreferenceObjective, PreferenceSettings, ReferenceModel
        from gptforge.train.optim import build_optimizer

        self.model = model.train()
        self.objective = PreferenceObjective("dpo", PreferenceSettings(beta=0.1), ReferenceModel(model))
        self.optimizer = build_optimizer(model, lr=5e-5, weight_decay=0.0)
        pairs = [encode_pair(Record(r, "bench", i), tokenizer, 1024) for i, r in enumerate(rows)]
        self.batches = [collate_pairs(pairs[i:i + batch], tokenizer.pad_token_id) for i in range(0, len(pairs), batch)]
        self.tokens = [sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs[i:i + batch])
                       for i in range(0, len(pairs), batch)]

    def __call__(self, index: int) -> float:
        import contextlib

        batch = self.batches[index % len(self.batches)]
        unit_loss, _ = self.objective.loss(self.model, batch, contextlib.nullcontext)
        loss = unit_loss / self.objective.count(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


class TRLStep:
    """TRL's DPOTrainer step: collate, compute_loss, backward, clip, its optimizer."""

    def __init__(self, model, tokenizer, rows: list[dict], batch: int, out: Path) -> None:
        import datasets
        import trl
        from transformers import PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=tokenizer.eos_token,
                                         pad_token=tokenizer.pad_token)
        config = trl.DPOConfig(output_dir=str(out), beta=0.1, loss_type=["sigmoid"], per_device_train_batch_size=batch,
                               learning_rate=5e-5, weight_decay=0.0, max_grad_norm=1.0, report_to=[], use_cpu=True,
                               bf16=False, fp16=False, max_length=None, precompute_ref_log_probs=False,
                               dataset_num_proc=None, seed=0)
        self.trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=config,
                                      processing_class=hf_tok, train_dataset=datasets.Dataset.from_list(rows))
        self.trainer.create_optimizer()
        self.model = self.trainer.model.train()
        data = self.trainer.train_dataset
        self.examples = [[data[j] for j in range(i, min(i + batch, len(data)))] for i in range(0, len(data), batch)]
        self.tokens = [sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in group)
                       for group in self.examples]

    def __call__(self, index: int) -> float:
        batch = self.trainer.data_collator(self.examples[index % len(self.examples)])
        loss = self.trainer.compute_loss(self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def timed(step, index: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step(index)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    import datasets
    import transformers

    from gptforge.tokenizer import Tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load_before, started = os.getloadavg(), time.perf_counter()

    text = corpus(args.text)
    tokenizer = Tokenizer.train_bpe([text[i:i + 2000] for i in range(0, min(len(text), 100_000), 2000)],
                                    vocab_size=args.vocab)
    n_steps = args.warmup + args.steps * args.rounds
    rows = make_pairs(text, args.batch * n_steps, args.prompt_chars, args.answer_chars)
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours_model = build_models(args, tokenizer, Path(tmp) / "hf")
        ours, peer = OursStep(ours_model, tokenizer, rows, args.batch), TRLStep(hf, tokenizer, rows, args.batch,
                                                                                Path(tmp) / "trl")
        if ours.tokens != peer.tokens:
            raise SystemExit(f"the two sides tokenized the pairs differently: {ours.tokens} vs {peer.tokens}")
        print(f"set up in {time.perf_counter() - started:.0f} s; {args.warmup} warm-up step(s) per side",
              file=sys.stderr, flush=True)
        for i in range(args.warmup):
            ours(i), peer(i)
        times: dict[str, list[tuple[float, float, int]]] = {"ours": [], "peer": []}
        for i in range(args.warmup, n_steps):  # alternate, so load changes hit both sides alike
            times["ours"].append((*timed(ours, i), ours.tokens[i]))
            times["peer"].append((*timed(peer, i), peer.tokens[i]))
            print(f"step {i + 1 - args.warmup}/{n_steps - args.warmup}: ours {times['ours'][-1][0]:.2f} s, "
                  f"TRL {times['peer'][-1][0]:.2f} s", file=sys.stderr, flush=True)
    rate = {side: statistics.median(tokens / wall for wall, _, tokens in values) for side, values in times.items()}
    # On a shared machine the wall clock includes waiting for a core; tokens per CPU-second does not.
    cpu_rate = {side: statistics.median(tokens / cpu for _, cpu, tokens in values) for side, values in times.items()}
    print(json.dumps({
        "benchmark": "dpo_vs_trl", "unit": "training tokens/s (chosen + rejected sequences, fp32)",
        "ours": round(rate["ours"], 1), "peer": round(rate["peer"], 1), "ratio": round(rate["ours"] / rate["peer"], 3),
        "peer_name": "trl.DPOTrainer",
        "tokens_per_cpu_second": {"ours": round(cpu_rate["ours"], 1), "peer": round(cpu_rate["peer"], 1),
                                  "ratio": round(cpu_rate["ours"] / cpu_rate["peer"], 3)}, "tokens_per_step": round(statistics.mean(ours.tokens[args.warmup:])),
        "settings": {k: v for k, v in vars(args).items()}, "parameters": sum(p.numel() for p in hf.parameters()),
        "torch": torch.__version__, "trl": __import__("trl").__version__, "machine": platform.processor() or
        platform.machine(), "load_average": {"before": [round(x, 2) for x in load_before],
                                                         "after": [round(x, 2) for x in os.getloadavg()]},
    }, indent=2))


if __name__ == "__main__":
    main()
