"""lm-evaluation-harness adapter: the `gptforge` LM class and a runner.

Importing this module registers the class with lm-eval under the name `gptforge`, so
`lm_eval.simple_evaluate(model="gptforge", model_args="pretrained=DIR", tasks=[...])` runs any
harness task on a gptforge model. `run_harness` does that import and returns the metrics in a flat,
JSON-ready shape: `{"results": {task: {metric: value}}, ...}`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from ..progress import Progress

from ..loading import load
from .scoring import context_length, prefix_token_id, score_continuations
from .tasks import cut_at_stop

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer

eval_logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
# Bookkeeping that lm-eval puts beside the metrics in its results.
NON_METRIC_KEYS = {"alias", "sample_len", "sample_count"}


def _positive_int(value: Any, name: str, default: int) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return default  # no memory probing on our side: "auto" means the default batch
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


@register_model("gptforge")
class GPTForgeLM(TemplateLM):
    """A gptforge model as an lm-eval LM: `pretrained=DIR` (or `model=`/`tokenizer=` objects from Python)."""

    def __init__(self, pretrained: Optional[str] = None, *, model: Optional["GPT"] = None,
                 tokenizer: Optional["Tokenizer"] = None, batch_size: Any = DEFAULT_BATCH_SIZE,
                 max_batch_size: Any = None, max_length: Any = None, device: Optional[str] = None,
                 dtype: Optional[str] = None, **unused: Any) -> None:
        super().__init__()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda by default; like its HF backend, use the CPU instead.
            eval_logger.warning("device %s requested but CUDA is not available; using the CPU", device)
            device = "cpu"
        if model is None:
            if pretrained is None:
                raise ValueError("the gptforge LM needs pretrained=DIR (a saved model directory) or a model object")
            model, tokenizer = load(pretrained, device=device or "auto", dtype=dtype)
            if tokenizer is None:
                raise ValueError(f"{pretrained}: no tokenizer.json beside the model; evaluation needs the tokenizer")
        elif tokenizer is None:
            raise ValueError("the gptforge LM got a model without a tokenizer; pass tokenizer=")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size_per_gpu = _positive_int(batch_size, "batch_size", DEFAULT_BATCH_SIZE)
        self._max_length = context_length(model, None if max_length is None else int(max_length))

    # ---- what TemplateLM needs ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else prefix_token_id(self.tokenizer)

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "gptforge-" + self.tokenizer.kind

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """Token ids of `string` (lm-eval's hook)."""
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        """Text of `tokens` (lm-eval's hook)."""
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        bar = Progress(len(pairs), desc="loglikelihood", unit="request", enabled=not disable_tqdm)
        scores = score_continuations(self.model, pairs, batch_size=self.batch_size_per_gpu,
                                     max_length=self.max_length, on_batch=lambda n, _t: bar.update(n))
        bar.close()
        answers = []
        for (cache_key, _, _), score in zip(requests, scores):
            answer = (score.logprob, score.is_greedy)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            answers.append(answer)
        return answers

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), in disjoint windows of the model's context."""
        pairs, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(self.tok_encode(text, add_special_tokens=False),
                                                self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owners.append(index)
        bar = Progress(len(pairs), desc="loglikelihood_rolling", unit="window", enabled=not disable_tqdm)
        scores = score_continuations(self.model, pairs, batch_size=self.batch_size_per_gpu,
                                     max_length=self.max_length, on_batch=lambda n, _t: bar.update(n))
        bar.close()
        totals = [0.0] * len(requests)
        for owner, score in zip(owners, scores):
            totals[owner] += score.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations cut at the task's `until` strings."""
        from ..generate import generate

        answers: list[Optional[str]] = [None] * len(requests)
        # Requests with the same generation settings are generated together.
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        bar = Progress(len(requests), desc="generate_until", unit="request", enabled=not disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(kwargs.pop("do_sample", False))
            params: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": do_sample}
            if do_sample:
                for name in ("temperature", "top_p", "top_k"):
                    if name in kwargs:
                        params[name] = kwargs[name]
            room = max(self.max_length - max_new, 1)
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start:start + self.batch_size_per_gpu]
                prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in chunk]
                outputs = generate(self.model, prompts, tokenizer=self.tokenizer, stop=until or None, **params)
                for i, output in zip(chunk, outputs):
                    answers[i] = cut_at_stop(output.text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
                bar.update(len(chunk))
        bar.close()
        return answers  # type: ignore[return-value]


def run_harness(model: "str | Path | GPT", tasks: Sequence[str], *, tokenizer: Optional["Tokenizer"] = None,
                include_path: Optional[str | Path] = None, num_fewshot: Optional[int] = None,
                limit: Optional[float] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                max_length: Optional[int] = None, device: Optional[str] = None, seed: int = 1234,
                log_samples: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks on a model (directory or object); metrics as {"results": {task: {metric: value}}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("--tasks: name at least one lm-eval task")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path: no such directory: {include_path}")
    manager = None
    if include_path is not None:
        # Indexing lm-eval's thousands of built-in YAMLs takes seconds; skip it when the local ones suffice.
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            manager = local
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {unknown}"
                         + ("" if include_path else " (custom task YAMLs need --include-path DIR)"))
    if isinstance(model, (str, Path)):
        lm = GPTForgeLM(str(model), batch_size=batch_size, max_length=max_length, device=device)
    else:
        lm = GPTForgeLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                     task_manager=manager, log_samples=log_samples, random_seed=seed,
                                     numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                     bootstrap_iters=0)
    return harness_report(output)


def harness_report(output: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's output reduced to {"results": {task: {metric: value}}, "n_shot", "n_samples", "versions"}.

    Metric keys lose lm-eval's ",none" filter suffix (other filters keep theirs: "exact_match,strict-match").
    """
    results: dict[str, dict[str, float]] = {}
    for task, values in output.get("results", {}).items():
        clean = {}
        for key, value in values.items():
            if key in NON_METRIC_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = key[:-len(",none")] if key.endswith(",none") else key
            clean[name] = float(value) if math.isfinite(float(value)) else None
        results[task] = clean
    report = {"results": results, "n_shot": output.get("n-shot", {}), "versions": output.get("versions", {}),
              "n_samples": {t: v.get("effective") for t, v in output.get("n-samples", {}).items()}}
    if "samples" in output:
        report["samples"] = output["samples"]
    return report


if __name__ == "__main__":
    # lm-eval's own command line with the `gptforge` class registered:
    # python -m gptforge.eval.harness run --model gptforge --model_args pretrained=DIR --tasks NAME
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
