"""Fill-in-the-middle quality: left-to-right loss with and without FIM training, and infill exact match.

Pretrains the demo recipe (src/gptforge/recipes/stdlib-code.yaml, shortened by the options) once per
`--rates` value, identical but for data.fim_rate. Validation documents are never FIM-transformed, so every
run's validation loss is a left-to-right figure on the same documents; it is reported per character
(the tokenizers differ by the four FIM tokens), and as bits per byte on held-out non-stdlib Python
(`gptforge.eval.heldout`, the demo's figure). For each FIM model, infill exact match: a held-out line
of a validation file is removed, the model fills the gap from the text around it (greedy), and the
middle must equal the line exactly. The model without FIM gets the same cases from the prefix alone
(its first generated line), the baseline an editor without infill would have.

    python benchmarks/fim_quality.py --steps 300 --max-bytes 1000000 --rates 0 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gptforge.data.shards import load_prepared
from gptforge.eval.heldout import bits_per_byte, load_heldout_python
from gptforge.eval.infill import evaluate_infill, infill_cases, validation_texts
from gptforge.loading import load
from gptforge.train.pretrain import load_recipe, pretrain

RECIPE = Path(__file__).resolve().parents[1] / "src" / "gptforge" / "recipes" / "stdlib-code.yaml"


def train(rate: float, args: argparse.Namespace) -> tuple[Path, float]:
    out = Path(args.out) / (f"fim{rate}" + (f"-p{args.fim_piece_chars}" if rate and args.fim_piece_chars else "")
                            + (f"-l{args.fim_line_rate}" if rate and args.fim_line_rate else "")
                            + (f"-s{args.seed}" if args.seed != 1337 else ""))
    overrides = [f"--train.max_steps={args.steps}", f"--data.max_bytes={args.max_bytes}", f"--data.fim_rate={rate}",
                 f"--data.eval_tokens={args.eval_tokens}", f"--train.eval_every={args.steps}",
                 f"--data.batch_size={args.batch_size}",
                 f"--train.checkpoint_every={args.steps}", f"--out_dir={out}", "--train.progress=false",
                 f"--data.fim_piece_chars={args.fim_piece_chars}", f"--data.fim_line_rate={args.fim_line_rate}",
                 f"--train.seed={args.seed}"]
    recipe = load_recipe(RECIPE, overrides)
    run = pretrain(recipe)
    result = json.loads((run / "result.json").read_text())
    return run, float(result["metrics"]["val_loss"])


def val_documents(args: argparse.Namespace) -> list[str]:
    return validation_texts(load_recipe(RECIPE, [f"--data.max_bytes={args.max_bytes}"]).data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--eval-tokens", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--fim-line-rate", type=float, default=0.0, help="data.fim_line_rate")
    parser.add_argument("--seed", type=int, default=1337, help="train.seed (the recipe's: 1337); another seed "
                        "measures run-to-run spread")
    parser.add_argument("--fim-piece-chars", type=int, default=0,
                        help="data.fim_piece_chars: FIM per piece of at most this many characters (0: whole files)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/fim-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    docs = val_documents(args)
    chars = sum(len(d) for d in docs)
    if not docs:
        raise SystemExit("no validation documents: raise --max-bytes")
    cases = infill_cases(docs, args.cases)
    heldout = [c.text for c in load_heldout_python().chunks]
    report = {"steps": args.steps, "seed": args.seed, "fim_piece_chars": args.fim_piece_chars, "fim_line_rate": args.fim_line_rate, "batch_size": args.batch_size,
              "max_bytes": args.max_bytes, "val_documents": len(docs), "runs": []}
    for rate in args.rates:
        started = time.perf_counter()
        run, val_loss = train(rate, args)
        manifest = load_prepared(run / "data").manifest
        nats_per_char = val_loss * manifest["split_tokens"]["val"] / chars
        model, tokenizer = load(run / "model")
        entry = {"fim_rate": rate, "val_loss_nats_per_token": round(val_loss, 4),
                 "val_nats_per_char": round(nats_per_char, 4),
                 "heldout_bits_per_byte": round(bits_per_byte(model, tokenizer, heldout)["bits_per_byte"], 4),
                 "train_seconds": round(time.perf_counter() - started)}
        infill = evaluate_infill(model, tokenizer, cases)  # without FIM tokens: the prefix-only figure alone
        entry.update(infill_exact_match=infill.exact_match, prefix_only_exact_match=infill.prefix_only_exact_match,
                     line_bits_per_byte=infill.bits_per_byte,
                     prefix_only_line_bits_per_byte=round(infill.prefix_only_bits_per_byte, 4))
        if entry["line_bits_per_byte"] is not None:
            entry["line_bits_per_byte"] = round(entry["line_bits_per_byte"], 4)
        report["runs"].append(entry)
        print(json.dumps(entry), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
