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
import random
import time
from pathlib import Path

import torch

from gptforge.data.corpus import Corpus
from gptforge.data.shards import _doc_in_val, load_prepared
from gptforge.eval.heldout import bits_per_byte, load_heldout_python
from gptforge.generate import generate
from gptforge.loading import load
from gptforge.train.pretrain import load_recipe, pretrain

RECIPE = Path(__file__).resolve().parents[1] / "src" / "gptforge" / "recipes" / "stdlib-code.yaml"


def train(rate: float, args: argparse.Namespace) -> tuple[Path, float]:
    out = Path(args.out) / f"fim{rate}"
    overrides = [f"--train.max_steps={args.steps}", f"--data.max_bytes={args.max_bytes}", f"--data.fim_rate={rate}",
                 f"--data.eval_tokens={args.eval_tokens}", f"--train.eval_every={args.steps}",
                 f"--data.batch_size={args.batch_size}",
                 f"--train.checkpoint_every={args.steps}", f"--out_dir={out}", "--train.progress=false"]
    recipe = load_recipe(RECIPE, overrides)
    run = pretrain(recipe)
    result = json.loads((run / "result.json").read_text())
    return run, float(result["metrics"]["val_loss"])


def val_documents(args: argparse.Namespace) -> list[str]:
    recipe = load_recipe(RECIPE, [f"--data.max_bytes={args.max_bytes}"])
    corpus = Corpus(recipe.data.sources, max_bytes=recipe.data.max_bytes)
    return [d.text for d in corpus.documents() if _doc_in_val(d.text, recipe.data.val_fraction)]


def infill_cases(docs: list[str], n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(prefix, line, suffix): a non-blank line of a validation file, with up to 600 characters each side."""
    if not docs:
        raise SystemExit("no validation documents: raise --max-bytes")
    rng = random.Random(seed)
    cases = []
    for _ in range(n * 20):
        if len(cases) == n:
            break
        lines = rng.choice(docs).splitlines(keepends=True)
        if len(lines) < 3:
            continue
        i = rng.randrange(1, len(lines) - 1)
        if not lines[i].strip() or len(lines[i]) > 80:
            continue
        prefix, suffix = "".join(lines[:i]), "".join(lines[i + 1:])
        cases.append((prefix[-600:], lines[i].rstrip("\n"), "\n" + suffix[:600]))
    return cases


def infill_exact_match(run: Path, cases: list[tuple[str, str, str]], use_suffix: bool) -> float:
    """Share of cases whose middle line the model restores exactly (greedy); without the suffix,
    the first line the model continues the prefix with."""
    model, tok = load(run / "model")
    hits = 0
    for prefix, line, suffix in cases:
        if use_suffix:
            out = generate(model, prefix, tok, suffix=suffix, max_new_tokens=40, temperature=0, truncate_prompt=True)
            hits += out[0].text == line
        else:
            text = generate(model, prefix, tok, max_new_tokens=40, temperature=0, truncate_prompt=True)[0].text
            hits += "\n" in text and text.split("\n")[0].rstrip() == line.rstrip()
    return hits / len(cases)


def heldout_bits_per_byte(run: Path, texts: list[str]) -> float:
    model, tok = load(run / "model")
    return bits_per_byte(model, tok, texts)["bits_per_byte"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-bytes", type=int, default=1_000_000)
    parser.add_argument("--eval-tokens", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/fim-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    docs = val_documents(args)
    chars = sum(len(d) for d in docs)
    cases = infill_cases(docs, args.cases)
    heldout = [c.text for c in load_heldout_python().chunks]
    report = {"steps": args.steps, "batch_size": args.batch_size, "max_bytes": args.max_bytes, "val_documents": len(docs), "runs": []}
    for rate in args.rates:
        started = time.perf_counter()
        run, val_loss = train(rate, args)
        manifest = load_prepared(Path(args.out) / f"fim{rate}" / "data").manifest
        nats_per_char = val_loss * manifest["split_tokens"]["val"] / chars
        entry = {"fim_rate": rate, "val_loss_nats_per_token": round(val_loss, 4),
                 "val_nats_per_char": round(nats_per_char, 4),
                 "heldout_bits_per_byte": round(heldout_bits_per_byte(run, heldout), 4),
                 "train_seconds": round(time.perf_counter() - started)}
        if rate > 0:
            entry["infill_exact_match"] = infill_exact_match(run, cases, use_suffix=True)
        else:
            entry["prefix_only_exact_match"] = infill_exact_match(run, cases, use_suffix=False)
        report["runs"].append(entry)
        print(json.dumps(entry), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
