"""`gptforge demo`: a small code model trained on the Python standard library, offline, in minutes.

The demo is the pretraining recipe `configs/stdlib-code.yaml` run through `gptforge.train.pretrain`
(the one training loop) with a wall-clock budget, followed by an honest report:

1. prepare the built-in `stdlib` corpus (byte-level BPE + token shards; reused when unchanged);
2. plan the run in time (`train.max_time` with `train.time_schedule`): warmup and decay are fractions
   of the budget and follow the speed measured during the run, evaluations take a bounded share of it,
   and the run ends within the budget with its decay complete (see `gptforge.train.budget`);
3. pretrain with a progress display, writing metrics.jsonl, loss_curve.png and model/;
4. measure validation perplexity on held-out tokens next to a unigram baseline (token frequencies of
   the training split, add-one smoothed) on exactly the same tokens, and quality on Python no corpus
   contains (`gptforge.eval.heldout`: bits per byte next to a unigram baseline, next-line exact match
   next to repeating the previous line);
5. complete a few code prompts with `gptforge.generate.generate` (`SAMPLING`: settings measured to
   keep a small model out of loops), each shown under its prompt;
6. write report.json and print the next commands.

Re-running reuses the corpus and the trained model; an interrupted run resumes from its checkpoint and
spends what is left of its budget (the seconds spent are in the checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
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
INFILL_CASES = 50  # held-out lines the demo asks the model to restore (a FIM model only; about 10 s)
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
    """The shipped recipe stdlib-code.yaml (package data; `configs/` of the source tree links to it)."""
    return Path(__file__).resolve().parent / "recipes" / RECIPE_NAME


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
    infill: Optional[dict[str, Any]] = None  # gptforge.eval.infill figures (None: the model has no FIM tokens)
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


# A time-planned run ends by its budget; max_steps only has to be out of reach.
TIME_PLANNED_MAX_STEPS = 1_000_000_000


def training_overrides(budget_s: float, steps: Optional[int] = None, progress: bool = True) -> list[str]:
    """The `train.*` settings that fit a run to `budget_s` seconds, or to exactly `steps` optimizer steps.

    Without `steps` the run is planned in time: no probe before it guesses a step count; the loop
    follows the speed it measures (warmup, decay, how often to evaluate, when to take the last step).
    With `steps` the schedule counts steps and the budget only stops a run that is too slow.
    """
    if not budget_s > 0:
        raise ValueError(f"the time budget must be positive, got {budget_s} s")
    common = [f"train.max_time={budget_s:.1f}", f"train.progress={str(progress).lower()}"]
    if steps is not None:
        return [f"train.max_steps={steps}", "train.time_schedule=false", f"train.eval_every={max(1, steps // 4)}",
                *common]
    # eval_every=1: evaluations are spaced by their measured cost (train.eval_share of the budget) alone.
    return [f"train.max_steps={TIME_PLANNED_MAX_STEPS}", "train.time_schedule=true", "train.eval_every=1", *common]


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
    from .train.pretrain import load_recipe, prepare_data

    if not minutes > 0:
        raise ValueError(f"--minutes must be positive, got {minutes}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    recipe_path = Path(recipe_path) if recipe_path else default_recipe_path()
    if not recipe_path.is_file():
        raise FileNotFoundError(f"demo recipe not found: {recipe_path} (pass --recipe PATH to a pretraining recipe)")
    out = Path(out_dir)
    if fresh:
        _remove_run_files(out)
    budget_s = minutes * 60.0
    state_path = out / DEMO_STATE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    result_path = out / "result.json"
    finished = (out / "model" / "config.json").is_file() and result_path.is_file() and \
        not json.loads(result_path.read_text(encoding="utf-8")).get("interrupted")
    resume = not finished and (out / "checkpoints" / "latest").exists() and "budget_s" in state
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
        _train_within_budget(recipe, out, state if resume else None, steps, budget_s, minutes,
                             (str(recipe_path), overrides), progress, echo)
    train_seconds = _elapsed(out / "metrics.jsonl")

    report = _measure(out, recipe, prompts, max_new_tokens, seed, train_seconds, finished, echo)
    echo(_next_steps(report))
    return report


def _measure(out: Path, recipe: Any, prompts: Sequence[str], max_new_tokens: int, seed: int,
             train_seconds: float, reused: bool, echo: Any) -> DemoReport:
    """Steps 3 and 4 of the demo: quality next to its baselines, sampled completions; writes report.json."""
    from .data.shards import load_prepared
    from .generate import generate
    from .loading import load

    echo("[3/4] quality on code the model did not train on")
    model, tokenizer = load(out / "model")
    corpus = load_prepared(out / "data")
    scores = validation_report(model, corpus, min(recipe.data.seq_len, model.config.block_size))
    echo("      validation files of the standard library (perplexity per token; lower is better):")
    echo(f"        model    {scores['val_perplexity']:10.2f}  ({scores['val_loss']:.3f} nats/token)")
    echo(f"        unigram  {scores['unigram_perplexity']:10.2f}  ({scores['unigram_loss']:.3f} nats/token; "
         "token frequencies alone, the baseline to beat)")
    heldout = _heldout_figures(model, tokenizer, echo)
    infill = _infill_figures(model, tokenizer, recipe, echo)

    echo("[4/4] completions: each prompt, then what the model wrote after it")
    echo("      " + BASE_MODEL_NOTE)
    outputs = generate(model, list(prompts), tokenizer, max_new_tokens=max_new_tokens, seed=seed, **SAMPLING)
    completions = []
    for prompt, output in zip(prompts, outputs):
        completions.append({"prompt": prompt, "completion": output.text})
        echo(_side_by_side(prompt, output.text))

    result_path = out / "result.json"
    result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    png = out / "loss_curve.png"
    report = DemoReport(
        out_dir=str(out), model_dir=str(out / "model"), loss_curve_png=str(png) if png.is_file() else None,
        parameters=model.num_params(), train_tokens_seen=int(result.get("tokens", 0)),
        steps=int(result.get("steps", 0)), train_seconds=round(train_seconds, 1),
        val_tokens=int(scores["val_tokens"]), val_loss=scores["val_loss"], val_perplexity=scores["val_perplexity"],
        unigram_loss=scores["unigram_loss"], unigram_perplexity=scores["unigram_perplexity"],
        reused_model=reused, completions=completions, heldout=heldout, infill=infill,
        corpus=list(corpus.manifest.get("selection", [])), sampling={**SAMPLING, "max_new_tokens": max_new_tokens})
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2))
    return report


def _remove_run_files(out: Path) -> None:
    """`--fresh`: delete the earlier training run in `out` (the prepared corpus stays)."""
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _train_within_budget(recipe: Any, out: Path, state: Optional[dict[str, Any]], steps: Optional[int],
                         budget_s: float, minutes: float, settings: tuple[str, list[str]], progress: bool,
                         echo: Any) -> None:
    """Pretrain (or resume) the demo run within its budget (or for `steps` steps) and say how it ended."""
    from .train.pretrain import pretrain

    if state is not None:  # resume: the same plan; the loop spends what is left of the budget
        steps = state.get("steps", state.get("max_steps"))
        budget_s = float(state.get("budget_s", budget_s))
        left = max(budget_s - _elapsed(out / "metrics.jsonl"), 0.0)
        echo(f"[2/4] resuming the interrupted run in {out} ({left / 60:.1f} of its {budget_s / 60:g} minute(s) left)")
    elif steps is not None:
        echo(f"[2/4] pretraining for {steps} steps (at most {minutes:g} minute(s))")
    else:
        echo(f"[2/4] pretraining for {minutes:g} minute(s): warmup, decay and evaluations follow the measured speed")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / DEMO_STATE, json.dumps({"steps": steps, "budget_s": budget_s, "recipe": settings[0],
                                                    "overrides": settings[1]}))
    pretrain(recipe, overrides=training_overrides(budget_s, steps, progress), resume=state is not None)
    result_path = out / "result.json"
    result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    if result:
        ending = ("the time budget ended it, with the learning-rate decay complete" if result.get("out_of_time")
                  and steps is None else "train.max_time cut it short" if result.get("out_of_time") else
                  "interrupted: run the same command again to resume" if result.get("interrupted") else
                  "all steps done")
        echo(f"      {result.get('steps', 0):,} steps, {result.get('tokens', 0):,} tokens in "
             f"{result.get('elapsed_s', 0.0):.0f} s of {budget_s:.0f} s ({ending})")


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


def _heldout_figures(model: torch.nn.Module, tokenizer: Any, echo: Any) -> Optional[dict[str, Any]]:
    """Bits per byte and next-line exact match on installed non-stdlib Python, printed; None when absent."""
    from .eval.heldout import evaluate_heldout_python

    try:
        result = evaluate_heldout_python(model, tokenizer)
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


def _infill_figures(model: torch.nn.Module, tokenizer: Any, recipe: Any, echo: Any,
                    cases: int = INFILL_CASES) -> Optional[dict[str, Any]]:
    """Fill in the middle on validation files, next to the same model without the suffix; None without FIM."""
    from .eval.infill import evaluate_infill, infill_cases, validation_texts
    from .fim import fim_tokens

    if fim_tokens(tokenizer) is None or recipe.data.split != "documents":
        return None
    chosen = infill_cases(validation_texts(recipe.data), cases, seed=recipe.train.seed)
    if not chosen:
        return None
    result = evaluate_infill(model, tokenizer, chosen)
    echo(f"      fill in the middle: a line taken out of a validation file, the code around it shown "
         f"({result.cases} lines, greedy):")
    echo(f"        bits per byte of the line  {result.bits_per_byte:6.3f}   (from the code before it alone: "
         f"{result.prefix_only_bits_per_byte:.3f}; lower means the code after the gap helps)")
    echo(f"        restored exactly           {result.exact_match:6.1%}   (from the code before it alone: "
         f"{result.prefix_only_exact_match:.1%})")
    if result.example is not None:
        ex = result.example
        before = ex["prefix"].rstrip("\n").split("\n")[-2:]
        after = ex["suffix"].lstrip("\n").split("\n")[:2]
        echo("      " + ("a line it restored:" if ex["restored"] else "what it put in one gap:"))
        for line in before:
            echo(f"        before | {line}")
        filled = ex["filled"].split("\n")
        more = f"   [and {len(filled) - 1} more line(s)]" if len(filled) > 1 else ""
        echo(f"        filled | {filled[0]}{more}")
        if not ex["restored"]:
            echo(f"        (file) | {ex['middle']}")
        for line in after:
            echo(f"        after  | {line}")
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
        *([f"  gptforge generate --model {model} --prompt $'def area(width, height):\\n    ' "
           "--suffix $'\\n    return result\\n' --max-new-tokens 24",
           "      (fill in the middle: the code before the cursor, and --suffix the code after it)"]
          if report.infill else []),
        f"  gptforge chat --model {model}",
        "      (a code model: it continues text; fine-tune it with `gptforge finetune` to follow instructions)",
        f"  gptforge serve --model {model} --port 8000",
        "      (an OpenAI-compatible API, and a chat page at http://127.0.0.1:8000/)",
        f"  gptforge explain --model {model} --text 'def __init__(self, name): self.name = name' --out explain",
        "      (what the model expected, token by token: explain/index.html)",
        "  gptforge demo --minutes 20 --fresh   (train longer for better completions)",
    ])


__all__ = ["DemoReport", "run_demo", "unigram_log_probs", "validation_report", "training_overrides",
           "default_recipe_path", "DEFAULT_PROMPTS", "SAMPLING", "BASE_MODEL_NOTE"]
