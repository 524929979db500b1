"""Recipe search for the demo: train one recipe variant for a fixed budget, then measure it on held-out Python.

A trial is the demo recipe (`configs/stdlib-code.yaml`, or `--recipe`) plus `section.key=value`
overrides, trained through `gptforge.train.pretrain` (the loop the demo runs) and then scored on
held-out Python that no corpus contains (`gptforge.eval.heldout`): bits per UTF-8 byte next to a
unigram baseline, and next-line exact match next to repeating the previous line.

The budget. The machine is shared, so a wall-clock budget would hand each variant whatever the other
users left it. By default (`--budget compute`) a trial gets the optimizer steps it would complete in
`--minutes` on this machine when quiet: the variant's step time relative to the reference recipe
(`--reference`, default the recipe itself without overrides) is measured side by side, alternating
single steps of both, and the reference's quiet step time is `--reference-step-s` (measured once,
stated in RESULTS.md). So steps = minutes * 60 / reference_step_s * (reference step time / variant
step time), step times in CPU seconds of one thread, and a busy machine only makes the trial take
longer, not train less. `--budget wall` trains
for `--minutes` of wall clock instead, with the schedule following elapsed time (what the demo does).
`--evaluate DIR` scores an existing model folder (e.g. one trained by an older checkout of the demo).

    python benchmarks/recipe_search.py --name vocab2k --minutes 3 data.vocab_size=2048
    python benchmarks/recipe_search.py --name old-demo --evaluate /tmp/old-demo/model

Prints one JSON object (figures, steps, tokens/s, the load average before and after) and appends it
to `--log` (JSON lines).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="trial name (its run folder is WORK/NAME)")
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget in wall-clock minutes")
    ap.add_argument("--recipe", default=str(REPO / "configs" / "stdlib-code.yaml"))
    ap.add_argument("--work", default="runs/recipe-search", help="folder for runs and prepared corpora")
    ap.add_argument("--log", default=None, help="JSON-lines file to append the result to (default WORK/trials.jsonl)")
    ap.add_argument("--evaluate", default=None, metavar="MODEL_DIR", help="only evaluate this model folder")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--lines", type=int, default=200, help="held-out lines for next-line exact match")
    ap.add_argument("--completions", action="store_true", help="also sample the demo's prompts")
    ap.add_argument("--budget", choices=["compute", "wall"], default="compute",
                    help="compute: steps the variant completes in --minutes on a quiet machine (default); "
                         "wall: --minutes of wall clock")
    ap.add_argument("--reference", nargs="*", default=[], metavar="OVERRIDE",
                    help="overrides of the reference recipe whose quiet step time is --reference-step-s")
    ap.add_argument("--reference-step-s", type=float, default=0.6,
                    help="seconds per optimizer step of the reference recipe on the quiet machine")
    ap.add_argument("--patch", action="append", default=[], metavar="NAME[:VALUE]",
                    help="an experimental model change not (yet) in gptforge, applied in this process only: "
                         "qknorm[:GAIN] (RMS-normalized queries and keys, times GAIN, before RoPE)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, section.key=value")
    return ap.parse_args()


def apply_patches(patches: list[str]) -> None:
    """Experimental model changes for this process (the saved model needs the same patch to reload)."""
    import torch.nn.functional as F

    import gptforge.model as M

    for patch in patches:
        name, _, value = patch.partition(":")
        if name == "qknorm":
            gain, plain = float(value or 1.0), M.apply_rope

            def normed_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
                # Attention calls apply_rope on q and k only: normalizing here is QK-norm.
                return plain(F.rms_norm(x, (x.shape[-1],)) * gain, cos, sin)

            M.apply_rope = normed_rope
        else:
            raise SystemExit(f"--patch {patch}: unknown patch (known: qknorm[:GAIN])")


def load_average() -> float:
    """1-minute load average (how busy the shared machine was)."""
    return round(os.getloadavg()[0], 2)


def data_dir(work: Path, recipe: Any) -> Path:
    """One prepared corpus per data setting, shared by every trial that uses it."""
    d = recipe.data
    key = json.dumps([d.sources, d.tokenizer, d.vocab_size, d.max_bytes, d.split, d.val_fraction], default=str)
    return work / f"data-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _timed_steps(recipe: Any, vocab_size: int) -> Any:
    """A closure running one optimizer step of the recipe's model on random tokens; returns its seconds."""
    import contextlib

    import torch.nn.functional as F

    from gptforge.model import GPT
    from gptforge.train.optim import build_optimizer
    from gptforge.train.pretrain import model_config

    d, cfg = recipe.data, recipe.train
    torch.manual_seed(0)
    model = GPT(model_config(recipe, vocab_size))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                kind=cfg.optimizer, muon_lr=cfg.muon_lr)
    per_micro = d.batch_size * d.seq_len
    accum = cfg.grad_accum_steps or (max(1, round(cfg.batch_tokens / per_micro)) if cfg.batch_tokens else 1)
    x = torch.randint(0, vocab_size, (d.batch_size, d.seq_len))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()

    def step() -> float:
        # CPU time of this process, not wall time: other users' load stretches wall time, not the work.
        started = time.process_time()
        for _ in range(accum):
            with amp:
                logits = model(x)
            F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - started

    return step


def relative_step_time(reference: Any, variant: Any, rounds: int = 5) -> tuple[float, float]:
    """Median CPU seconds per optimizer step of the reference and the variant, timed alternately.

    CPU time with one torch thread (the trials' setting) measures the work of a step whatever else the
    machine runs; wall time on a machine at load 8 swung the ratio by a factor of two.
    """
    ref_step = _timed_steps(reference, reference.data.vocab_size)
    var_step = _timed_steps(variant, variant.data.vocab_size)
    ref_step(), var_step()  # warm-up
    ref, var = [], []
    for _ in range(rounds):
        ref.append(ref_step())
        var.append(var_step())
    return statistics.median(ref), statistics.median(var)


def train_trial(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    """Train the variant for the budget; return its run folder and the training figures."""
    from gptforge.train.pretrain import load_recipe, prepare_data, pretrain

    run = work / args.name
    if run.exists():
        raise SystemExit(f"{run} exists: pick another --name or remove it")
    budget = args.minutes * 60.0
    figures: dict[str, Any] = {}
    recipe = load_recipe(args.recipe, args.overrides)
    common = [f"out_dir={run}", f"data.dir={data_dir(work, recipe)}", "train.eval_every=0",
              "train.checkpoint_every=0", "train.progress=false", "train.save_best=false", "data.eval_tokens=16384"]
    if args.budget == "wall":
        timing = ["train.max_steps=1000000", f"train.max_time={budget:.0f}", "train.time_schedule=true"]
    else:
        ref_s, var_s = relative_step_time(load_recipe(args.recipe, args.reference), recipe)
        steps = max(10, round(budget / args.reference_step_s * ref_s / var_s))
        figures.update(probe_reference_s=round(ref_s, 3), probe_variant_s=round(var_s, 3), budget_steps=steps)
        timing = [f"train.max_steps={steps}", f"train.max_time={budget * 60:.0f}"]  # the time limit only as a guard
    recipe = load_recipe(args.recipe, [*args.overrides, *common, *timing])
    prepare_data(recipe, progress=False)  # outside the budget: the demo reuses its corpus too
    started = time.perf_counter()
    pretrain(recipe)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_done = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    rates = [r["tokens_per_s"] for r in steps_done[len(steps_done) // 10:]]  # skip warm-up steps
    figures.update(steps=steps_done[-1]["step"], tokens=steps_done[-1]["tokens"], train_s=round(wall, 1),
                   tokens_per_s=round(statistics.median(rates)) if rates else None,
                   final_loss=round(sum(r["loss"] for r in steps_done[-20:]) / len(steps_done[-20:]), 4),
                   val_loss=round(evals[-1]["val_loss"], 4) if evals else None)
    return run, figures


def evaluate(model_dir: Path, lines: int, completions: bool) -> dict[str, Any]:
    """Held-out figures of a model folder (and, optionally, the demo's sampled completions)."""
    from gptforge.eval.heldout import evaluate_heldout_python
    from gptforge.loading import load

    model, tokenizer = load(model_dir)
    started = time.perf_counter()
    report = evaluate_heldout_python(model, tokenizer, max_lines=lines)
    out = {"parameters": model.num_params(), "bits_per_byte": round(report.bits_per_byte, 4),
           "unigram_bits_per_byte": round(report.unigram_bits_per_byte, 4),
           "next_line_em": round(report.next_line_exact_match, 4),
           "repeat_line_em": round(report.repeat_line_exact_match, 4), "lines": report.lines,
           "heldout_fingerprint": report.fingerprint[:12], "eval_s": round(time.perf_counter() - started, 1)}
    if completions:
        from gptforge.demo import DEFAULT_PROMPTS
        from gptforge.generate import generate

        outputs = generate(model, list(DEFAULT_PROMPTS), tokenizer, max_new_tokens=48, do_sample=True, temperature=0.7,
                           top_k=40, seed=0)
        out["completions"] = [p + o.text for p, o in zip(DEFAULT_PROMPTS, outputs)]
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_patches(args.patch)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"name": args.name, "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": args.minutes,
                              "budget": args.budget, "overrides": args.overrides, "patches": args.patch,
                              "reference": args.reference,
                              "load_before": load_average(),
                              "threads": torch.get_num_threads()}
    if args.evaluate:
        model_dir: Optional[Path] = Path(args.evaluate)
        result["evaluated"] = str(model_dir)
    else:
        run, figures = train_trial(args, work)
        result.update(figures)
        model_dir = run / "model"
    result["load_after_train"] = load_average()
    result.update(evaluate(model_dir, args.lines, args.completions))
    result["load_after"] = load_average()
    log = Path(args.log) if args.log else work / "trials.jsonl"
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
