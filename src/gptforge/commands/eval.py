"""`gptforge eval --model DIR`: perplexity (--text/--shards), held-out Python (--heldout-python), JSONL task
metrics (--task), lm-eval (--harness)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `gptforge eval`."""
    parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors + tokenizer)")
    parser.add_argument("--output", default=None,
                        help="JSON report path (default: eval_report.json in the current directory)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="context length used (default: the model's)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of few-shot example draws")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")

    ppl = parser.add_argument_group("perplexity")
    ppl.add_argument("--text", nargs="+", default=[], metavar="FILE", help="UTF-8 text file(s)")
    ppl.add_argument("--shards", default=None, metavar="DIR", help="token shard directory written by `gptforge prepare`")
    ppl.add_argument("--split", default="val", help="shard split to read (default: val)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens newly scored per window (default: the context length, no overlap)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of each source")

    code = parser.add_argument_group("held-out Python (code models)")
    code.add_argument("--heldout-python", action="store_true",
                      help="bits per byte and next-line exact match on installed non-stdlib Python (gptforge's "
                           "dependencies), each next to its baseline")
    code.add_argument("--heldout-lines", type=int, default=None,
                      help="target lines for next-line exact match (default 200)")

    task = parser.add_argument_group("JSONL task")
    task.add_argument("--task", default=None, metavar="FILE.jsonl", help="task examples, one JSON object per line")
    task.add_argument("--task-type", default=None,
                      choices=["multiple_choice", "classification", "qa", "translation", "summarization",
                               "generation"])
    task.add_argument("--shots", type=int, default=0, help="few-shot examples before each query")
    task.add_argument("--fewshot-file", default=None, help="draw few-shot examples from this JSONL file instead")
    task.add_argument("--template", default=None,
                      help="prompt template with {field} placeholders (e.g. '{text}\\nSentiment:')")
    task.add_argument("--labels", default=None, help="classification labels, comma-separated (default: from data)")
    task.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    task.add_argument("--max-new-tokens", type=int, default=64, help="generation length for generation tasks")
    task.add_argument("--stop", action="append", default=None,
                      help="stop string for generation tasks (repeatable; default: a blank line)")
    task.add_argument("--metrics", default=None,
                      help="generation metrics, comma-separated (exact_match,f1,bleu,chrf,rouge1,rouge2,rougeL)")
    task.add_argument("--log-samples", action="store_true", help="keep per-example predictions in the report")

    harness = parser.add_argument_group("lm-evaluation-harness")
    harness.add_argument("--harness", action="store_true", help="run lm-eval tasks through the gptforge LM class")
    harness.add_argument("--tasks", default=None, help="lm-eval task names, comma-separated")
    harness.add_argument("--include-path", default=None, help="directory of custom lm-eval task YAMLs")
    harness.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot count (default: task's)")
    harness.add_argument("--harness-limit", type=float, default=None, help="lm-eval --limit (count or fraction)")


def _check(args: argparse.Namespace) -> None:
    if args.heldout_lines is not None and not args.heldout_python:
        raise ValueError("--heldout-lines belongs to --heldout-python; add --heldout-python")
    if not (args.text or args.shards or args.task or args.harness or args.heldout_python):
        raise ValueError("nothing to evaluate: give --text FILE, --shards DIR, --heldout-python, --task FILE.jsonl "
                         "or --harness --tasks")
    if args.task and not args.task_type:
        raise ValueError("--task needs --task-type (multiple_choice, classification, qa, translation, "
                         "summarization or generation)")
    if args.harness and not args.tasks:
        raise ValueError("--harness needs --tasks NAME[,NAME...]")
    if args.harness and importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--harness needs lm-evaluation-harness, which is not installed: "
                         "pip install 'lm-eval>=0.4.2' (or pip install -e '.[eval]' in the repository)")
    if (args.tasks or args.include_path) and not args.harness:
        raise ValueError("--tasks/--include-path belong to --harness; add --harness")
    # Missing inputs fail before the model is loaded.
    for flag, path in [("--text", p) for p in args.text] + [("--task", args.task), ("--fewshot-file", args.fewshot_file)]:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such file: {path}")
    for flag, path in (("--shards", args.shards), ("--include-path", args.include_path)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag}: no such directory: {path}")
    for name in ("batch_size", "max_tokens", "stride", "max_new_tokens", "heldout_lines"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the JSON report atomically, print a table."""
    _check(args)
    from ..loading import load

    output = Path(args.output or "eval_report.json")
    model, tokenizer = load(args.model, device=args.device or "auto", dtype=args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {args.model}: no tokenizer.json beside the model; evaluation needs it")
    progress = not args.no_progress
    report: dict[str, Any] = {"model": str(args.model), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    started = time.perf_counter()

    if args.text or args.shards:
        from ..eval.perplexity import perplexity_of_file, perplexity_of_shards

        common = dict(max_length=args.max_length, stride=args.stride, batch_size=args.batch_size,
                      max_tokens=args.max_tokens, progress=progress)
        runs = [perplexity_of_file(model, tokenizer, path, **common) for path in args.text]
        if args.shards:
            runs.append(perplexity_of_shards(model, tokenizer, args.shards, split=args.split, **common))
        report["perplexity"] = [r.to_dict() for r in runs]

    if args.heldout_python:
        from ..eval.heldout import NEXT_LINES, evaluate_heldout_python

        say = (lambda message: print(message, file=sys.stderr)) if progress else None
        result = evaluate_heldout_python(model, tokenizer, max_lines=args.heldout_lines or NEXT_LINES,
                                         max_length=args.max_length, batch_size=args.batch_size, progress=say)
        for message in result.missing:
            print(f"note: {message}", file=sys.stderr)
        report["heldout_python"] = result.to_dict()

    if args.task:
        from ..eval.tasks import FEWSHOT_DELIMITER, evaluate_task

        labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
        names = [x.strip() for x in args.metrics.split(",")] if args.metrics else None
        template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
        result = evaluate_task(model, tokenizer, args.task, args.task_type, shots=args.shots,
                               fewshot_file=args.fewshot_file, seed=args.seed, template=template, labels=labels,
                               limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                               max_new_tokens=args.max_new_tokens, stop=args.stop or [FEWSHOT_DELIMITER],
                               metric_names=names, progress=progress)
        report["task"] = result.to_dict(with_predictions=args.log_samples)

    if args.harness:
        from ..eval.harness import run_harness

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        report["harness"] = run_harness(model, tasks, tokenizer=tokenizer, include_path=args.include_path,
                                        num_fewshot=args.num_fewshot, limit=args.harness_limit,
                                        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                                        log_samples=args.log_samples)

    report["seconds"] = round(time.perf_counter() - started, 3)
    atomic_write_text(output, json.dumps(report, indent=2, allow_nan=True, default=str) + "\n")
    print(format_table(report))
    print(f"report: {output}")
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def format_table(report: dict[str, Any]) -> str:
    """The report's figures as an aligned text table: source | metric | value."""
    rows: list[tuple[str, str, str]] = []
    for run in report.get("perplexity", []):
        for key in ("perplexity", "bits_per_byte", "loss", "num_tokens"):
            rows.append((run["source"], key, _fmt(run[key])))
    if "heldout_python" in report:
        code = report["heldout_python"]
        name = f"held-out Python ({len(code['versions'])} packages)"
        for key in ("bits_per_byte", "unigram_bits_per_byte", "next_line_exact_match", "repeat_line_exact_match",
                    "lines"):
            rows.append((name, key, _fmt(code[key])))
    if "task" in report:
        task = report["task"]
        name = f"{Path(task['task']).name} ({task['task_type']}, {task['shots']}-shot)"
        for key, value in task["metrics"].items():
            rows.append((name, key, _fmt(value)))
    for task, values in report.get("harness", {}).get("results", {}).items():
        for key, value in values.items():
            rows.append((f"lm-eval {task}", key, _fmt(value)))
    widths = [max(len(r[i]) for r in rows + [("source", "metric", "value")]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("source", "metric", "value"), widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
    return "\n".join(lines)
