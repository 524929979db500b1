"""`gptforge demo`: a small code model trained on the Python standard library, offline, in minutes.

The demo is the pretraining recipe `configs/stdlib-code.yaml` run through `gptforge.train.pretrain`
(the one training loop) with a wall-clock budget, followed by an honest report:

1. prepare the built-in `stdlib` corpus (byte-level BPE + token shards; reused when unchanged);
2. fit the number of optimizer steps to the budget (a short timing probe of forward/backward passes),
   so the learning-rate schedule finishes inside it; `train.max_time` is a hard stop as well;
3. pretrain with a progress bar, writing metrics.jsonl, loss_curve.png and model/;
4. measure validation perplexity on held-out tokens next to a unigram baseline (token frequencies of
   the training split, add-one smoothed) on exactly the same tokens, and quality on Python no corpus
   contains (`gptforge.eval.heldout`: bits per byte next to a unigram baseline, next-line exact match
   next to repeating the previous line);
5. complete a few code prompts with `gptforge.generate.generate` (`SAMPLING`: settings measured to
   keep a small model out of loops), each shown under its prompt;
6. write report.json and print the next commands.

Re-running reuses the corpus and the trained model; an interrupted run resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .atomic import atomic_write_text
from .config import ConfigError
from .eval.heldout import unigram_log_probs

log = logging.getLogger(__name__)

RECIPE_NAME = "stdlib-code.yaml"
DEFAULT_MINUTES = 6.0
# Prompts a model of the standard library has seen thousands of variants of.
DEFAULT_PROMPTS = (
    "def __init__(self",
    "import os\nimport sys\n\n\ndef ",
    "    def __repr__(self):\n        return ",
    "for i in range(",
    "class ",
)
EVAL_TOKENS = 100_000  # validation tokens for the final report (the same tokens for model and baseline)
# Sampling for the shown completions, measured in benchmarks/RESULTS.md ("Sampling settings"): fewer
# degenerate loops than plain temperature sampling at no loss of next-line exact match.
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 40}
BASE_MODEL_NOTE = ("This is a small base model: it continues code it is given, it does not follow instructions "
                   "or answer questions (an assistant needs fine-tuning: `gptforge finetune`).")
DEMO_STATE = "demo.json"
# Files of the training run inside the demo folder; `--fresh` removes these and keeps the corpus.
RUN_FILES = ("checkpoints", "model", "best", "metrics.jsonl", "loss_curve.png", "result.json", "config.yaml",
             "report.json", DEMO_STATE)


def default_recipe_path() -> Path:
    """configs/stdlib-code.yaml of the source tree this package is installed from."""
    return Path(__file__).resolve().parents[2] / "configs" / RECIPE_NAME


@dataclass
class DemoReport:
    """What the demo measured; written to report.json."""

    out_dir: str
    model_dir: str
    loss_curve_png: Optional[str]
    parameters: int
    train_tokens_seen: int
    steps: int
    train_seconds: float
    val_tokens: int
    val_loss: float
    val_perplexity: float
    unigram_loss: float
    unigram_perplexity: float
    reused_model: bool
    completions: list[dict[str, str]] = field(default_factory=list)
    heldout: Optional[dict[str, Any]] = None  # gptforge.eval.heldout figures (None where no package was found)
    corpus: list[dict[str, Any]] = field(default_factory=list)  # what the curated sources kept and left out
    sampling: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- measurements ------------------------------------------------------------------------------------

@torch.no_grad()
def validation_report(model: torch.nn.Module, corpus: Any, seq_len: int, batch_size: int = 8,
                      max_tokens: int = EVAL_TOKENS) -> dict[str, float]:
    """Model and unigram cross-entropy (nats/token) and perplexity on the same validation windows."""
    from .data.loader import eval_windows

    unigram = torch.from_numpy(unigram_log_probs(corpus.tokens("train"), model.config.vocab_size))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model_nll = unigram_nll = 0.0
    count = 0
    try:
        for x, y in eval_windows(corpus, "val", seq_len, batch_size, max_tokens):
            logits = model(x.to(device)).float()
            model_nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.to(device).reshape(-1),
                                               reduction="sum"))
            unigram_nll -= float(unigram[y].sum())
            count += y.numel()
    finally:
        model.train(was_training)
    val_loss, uni_loss = model_nll / count, unigram_nll / count
    return {"val_tokens": count, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
            "unigram_loss": uni_loss, "unigram_perplexity": math.exp(min(uni_loss, 50.0))}


def seconds_per_step(recipe: Any, vocab_size: int, repeats: int = 2) -> tuple[float, float]:
    """Timing probe: (seconds per optimizer step, seconds per evaluated token) for the recipe's model and batch.

    Runs forward+backward passes on random tokens (no optimizer, nothing kept), so the demo can size
    the number of steps to its budget before the real run starts.
    """
    from .model import GPT
    from .train.pretrain import model_config

    d, cfg = recipe.data, recipe.train
    torch.manual_seed(0)
    model = GPT(model_config(recipe, vocab_size))
    x = torch.randint(0, vocab_size, (d.batch_size, d.seq_len))
    tokens_per_micro = d.batch_size * d.seq_len
    accum = cfg.grad_accum_steps or (max(1, round(cfg.batch_tokens / tokens_per_micro)) if cfg.batch_tokens else 1)

    def fwd_bwd() -> None:
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), x.reshape(-1)).backward()

    fwd_bwd()  # warm-up: allocator and kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        fwd_bwd()
    per_micro = (time.perf_counter() - started) / repeats
    with torch.no_grad():
        started = time.perf_counter()
        model(x)
        per_eval_token = (time.perf_counter() - started) / tokens_per_micro
    # ~10% for the optimizer step, data loading and logging on top of forward/backward.
    return per_micro * accum * 1.1, per_eval_token


def plan_steps(budget_s: float, step_s: float, eval_s: float, evaluations: int = 5) -> int:
    """Optimizer steps that fit the budget after `evaluations` validation passes."""
    return max(10, int((budget_s - evaluations * eval_s) / max(step_s, 1e-6)))


# ---- the demo ----------------------------------------------------------------------------------------

def run_demo(out_dir: str | Path = "runs/demo", *, minutes: float = DEFAULT_MINUTES,
             recipe_path: Optional[str | Path] = None, overrides: Sequence[str] = (), fresh: bool = False,
             steps: Optional[int] = None,
             prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 48, seed: int = 0,
             progress: bool = True, echo: Any = print) -> DemoReport:
    """Prepare the stdlib corpus, pretrain within `minutes`, evaluate, complete prompts; returns the report.

    `steps` fixes the number of optimizer steps instead of fitting them to the budget (the budget still
    stops the run); `overrides` are `section.key=value` changes to the recipe.
    """
    from .data.shards import load_prepared
    from .generate import generate
    from .model import GPT
    from .train.pretrain import load_recipe, prepare_data, pretrain

    if not minutes > 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    recipe_path = Path(recipe_path) if recipe_path else default_recipe_path()
    if not recipe_path.is_file():
        raise FileNotFoundError(f"demo recipe not found: {recipe_path} (pass --recipe PATH to a pretraining recipe)")
    out = Path(out_dir)
    if fresh:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    budget_s = minutes * 60.0
    state_path = out / DEMO_STATE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    result_path = out / "result.json"
    finished = (out / "model" / "config.json").is_file() and result_path.is_file() and \
        not json.loads(result_path.read_text(encoding="utf-8")).get("interrupted")
    resume = not finished and (out / "checkpoints" / "latest").exists() and bool(state.get("max_steps"))
    overrides = list(overrides)
    if (finished or resume) and state and (state.get("overrides") != overrides
                                           or state.get("recipe") != str(recipe_path)):
        # The corpus and model on disk belong to the earlier settings: keep using those, never mix.
        echo(f"note: {out} was trained with {state.get('recipe')} {' '.join(state.get('overrides') or [])}; "
             "reusing it with those settings (pass --fresh to train with the new ones)")
        recipe_path, overrides = Path(state["recipe"]), list(state.get("overrides") or [])
    base_overrides = [f"out_dir={out}", f"data.dir={out / 'data'}", f"train.seed={1337 + seed}"]
    recipe = load_recipe(recipe_path, [*base_overrides, *overrides])
    if not recipe.data.sources:
        raise ConfigError(f"{recipe_path}: data.sources is empty; the demo recipe should read 'stdlib'")

    echo(f"[1/4] corpus: the Python standard library -> {out / 'data'}")
    corpus = prepare_data(recipe, progress=progress)
    for selection in corpus.manifest.get("selection", []):
        echo("      " + _selection_sentence(selection))
    echo(f"      {corpus.num_tokens('train'):,} training and {corpus.num_tokens('val'):,} validation tokens "
         f"(validation: whole files), vocabulary {corpus.vocab_size:,}")

    if finished:
        echo(f"[2/4] reusing the model trained earlier in {out / 'model'} (pass --fresh to train again)")
    else:
        if resume:
            steps = int(state["max_steps"])
            spent = float(state.get("budget_s", budget_s)) - _elapsed(out / "metrics.jsonl")
            budget_s = max(spent, 30.0)
            echo(f"[2/4] resuming the interrupted run in {out} ({budget_s / 60:.1f} minutes left)")
        elif steps is not None:
            echo(f"[2/4] pretraining for {steps} steps (at most {minutes:g} minute(s))")
        else:
            step_s, eval_token_s = seconds_per_step(recipe, corpus.vocab_size)
            eval_tokens = min(recipe.data.eval_tokens or corpus.num_tokens("val"), corpus.num_tokens("val"))
            steps = plan_steps(budget_s, step_s, eval_tokens * eval_token_s)
            echo(f"[2/4] pretraining for about {minutes:g} minute(s): {steps} steps at ~{step_s:.2f} s/step")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state_path, json.dumps({"max_steps": steps, "budget_s": minutes * 60.0,
                                                  "recipe": str(recipe_path), "overrides": overrides}))
        timing = [f"train.max_steps={steps}", f"train.max_time={budget_s * 1.1:.1f}",
                  f"train.eval_every={max(1, steps // 4)}", f"train.progress={str(progress).lower()}"]
        pretrain(recipe, overrides=timing, resume=resume)
    train_seconds = _elapsed(out / "metrics.jsonl")

    echo("[3/4] quality on code the model did not train on")
    model = GPT.from_pretrained(out / "model")
    corpus = load_prepared(out / "data")
    scores = validation_report(model, corpus, min(recipe.data.seq_len, model.config.block_size))
    echo("      validation files of the standard library (perplexity per token; lower is better):")
    echo(f"        model    {scores['val_perplexity']:10.2f}  ({scores['val_loss']:.3f} nats/token)")
    echo(f"        unigram  {scores['unigram_perplexity']:10.2f}  ({scores['unigram_loss']:.3f} nats/token; "
         "token frequencies alone, the baseline to beat)")
    heldout = _heldout_figures(model, echo)

    echo("[4/4] completions: each prompt, then what the model wrote after it")
    echo("      " + BASE_MODEL_NOTE)
    outputs = generate(model, list(prompts), max_new_tokens=max_new_tokens, seed=seed, **SAMPLING)
    completions = []
    for prompt, output in zip(prompts, outputs):
        completions.append({"prompt": prompt, "completion": output.text})
        echo(_side_by_side(prompt, output.text))

    result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    png = out / "loss_curve.png"
    report = DemoReport(
        out_dir=str(out), model_dir=str(out / "model"), loss_curve_png=str(png) if png.is_file() else None,
        parameters=model.num_params(), train_tokens_seen=int(result.get("tokens", 0)),
        steps=int(result.get("steps", 0)), train_seconds=round(train_seconds, 1),
        val_tokens=int(scores["val_tokens"]), val_loss=scores["val_loss"], val_perplexity=scores["val_perplexity"],
        unigram_loss=scores["unigram_loss"], unigram_perplexity=scores["unigram_perplexity"],
        reused_model=finished, completions=completions, heldout=heldout,
        corpus=list(corpus.manifest.get("selection", [])), sampling={**SAMPLING, "max_new_tokens": max_new_tokens})
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2))
    echo(_next_steps(report))
    return report


def _elapsed(metrics_path: Path) -> float:
    """Training seconds recorded so far in a metrics.jsonl (0 when there is none)."""
    if not metrics_path.is_file():
        return 0.0
    elapsed = 0.0
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            elapsed = max(elapsed, float(json.loads(line).get("elapsed_s", 0.0)))
        except (ValueError, AttributeError):
            continue  # a torn last line after kill -9
    return elapsed


def _selection_sentence(selection: dict[str, Any]) -> str:
    from .data.corpus import Selection

    return Selection(**selection).summary()


def _heldout_figures(model: torch.nn.Module, echo: Any) -> Optional[dict[str, Any]]:
    """Bits per byte and next-line exact match on installed non-stdlib Python, printed; None when absent."""
    from .eval.heldout import evaluate_heldout_python

    try:
        result = evaluate_heldout_python(model, model.tokenizer)
    except FileNotFoundError as exc:
        echo(f"      held-out Python: skipped ({exc})")
        return None
    for message in result.missing:
        echo(f"      note: {message}")
    echo(f"      Python that is not the standard library ({', '.join(result.versions)}; "
         f"{result.bytes / 1000:.0f} kB, in no training corpus):")
    echo(f"        bits per byte          {result.bits_per_byte:6.3f}   (unigram baseline "
         f"{result.unigram_bits_per_byte:.3f}; lower is better)")
    echo(f"        next-line exact match  {result.next_line_exact_match:6.1%}   (repeating the previous line: "
         f"{result.repeat_line_exact_match:.1%}; {result.lines} lines, greedy)")
    return result.to_dict()


def _side_by_side(prompt: str, completion: str, max_lines: int = 12) -> str:
    """The prompt, then the code as it reads with the completion: from the prompt's last line on."""
    prompt_lines = prompt.split("\n")
    lines = ["  " + "-" * 60]
    lines += [f"  prompt     | {line}" for line in prompt_lines]
    body = (prompt_lines[-1] + completion).rstrip("\n").split("\n")
    lines += [f"  {'continued' if i == 0 else '':<10} | {line}" for i, line in enumerate(body[:max_lines])]
    if len(body) > max_lines:
        lines.append(f"  {'':<10} | ...")
    return "\n".join(lines)


def _sampling_flags() -> str:
    """`SAMPLING` as `gptforge generate` flags."""
    flags = ["--do-sample"] if SAMPLING.get("do_sample") else []
    flags += [f"--{k.replace('_', '-')} {v}" for k, v in SAMPLING.items() if k != "do_sample"]
    return " ".join(flags)


def _next_steps(report: DemoReport) -> str:
    model = report.model_dir
    better = "below" if report.val_perplexity < report.unigram_perplexity else "NOT below"
    quality = []
    if report.heldout:
        h = report.heldout
        quality = [f"On Python it never saw: {h['bits_per_byte']:.3f} bits per byte (unigram "
                   f"{h['unigram_bits_per_byte']:.3f}), next line exactly right {h['next_line_exact_match']:.1%} "
                   "of the time."]
    return "\n".join([
        "",
        f"Done. Validation perplexity {report.val_perplexity:.2f} is {better} the unigram baseline "
        f"{report.unigram_perplexity:.2f}.",
        *quality,
        f"  model:       {model}  ({report.parameters:,} parameters, {report.steps} steps, "
        f"{report.train_tokens_seen:,} tokens)",
        f"  loss curve:  {report.loss_curve_png}",
        f"  report:      {Path(report.out_dir) / 'report.json'}",
        "",
        "Next:",
        f"  gptforge generate --model {model} --prompt 'def fibonacci(n):' --max-new-tokens 64 {_sampling_flags()}",
        "      (sampled: greedy decoding sends a model this small into loops)",
        f"  gptforge chat --model {model}",
        "      (a code model: it continues text; fine-tune it with `gptforge finetune` to follow instructions)",
        f"  gptforge serve --model {model} --port 8000",
        "      (an OpenAI-compatible API, and a chat page at http://127.0.0.1:8000/)",
        f"  gptforge explain --model {model} --text 'import os' --out explain",
        "      (what the model expected, token by token: explain/index.html)",
        "  gptforge demo --minutes 20 --fresh   (train longer for better completions)",
    ])


__all__ = ["DemoReport", "run_demo", "unigram_log_probs", "validation_report", "seconds_per_step", "plan_steps",
           "default_recipe_path", "DEFAULT_PROMPTS", "SAMPLING", "BASE_MODEL_NOTE"]
