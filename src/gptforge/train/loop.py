"""The training loop: one loop for pretraining and fine-tuning.

Public API (stable; fine-tuning builds on it):

    cfg = TrainConfig(max_steps=1000, lr=3e-4, eval_every=100, checkpoint_every=100)
    result = train(model, cfg, train_source, "runs/x", evaluate=evaluate, save_model=None, resume=False)

`train_source` is any object with
    next_batch() -> (input_ids (B, T) long, labels (B, T) long, -100 = ignored position)
    state_dict() -> dict          (JSON-able scalars/lists, or tensors: the data position)
    load_state_dict(state) -> None
Labels are already shifted: labels[:, t] is the target for input_ids[:, t]. Under torchrun each rank
owns its own source (the source decides which samples a rank sees).

`objective` turns a micro-batch into a loss; the default, `TokenCrossEntropy`, is the mean cross-entropy
per target token over the whole step. Another objective (e.g. preference tuning's, whose batches hold
chosen/rejected pairs) gives a batch source of its own batch type (a tensor, or a tuple or dict of
tensors) and reports extra metrics, averaged like the loss and logged in each step record.

`evaluate(model) -> dict[str, float]` runs on every rank with the bare model in eval mode, under
`torch.no_grad()` and the training autocast; early stopping watches `cfg.early_stopping_metric`.
`save_model(model, directory)` writes a model folder (default: `gptforge.loading.save(directory, model)`,
without a tokenizer; pretraining passes one that adds it, LoRA one that saves adapters instead).
Only parameters with `requires_grad` are optimized.

The run folder gets:
    metrics.jsonl          one record per step (loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s, mfu;
                           progress in a time-budgeted run) and per evaluation (the evaluate() keys)
    loss_curve.png         train and eval losses
    checkpoints/step-N/    see `checkpointing` (model, optimizer, TrainState, RNG, data position, config)
    checkpoints/latest     name of the newest complete checkpoint (replaced by atomic rename)
    model/                 the final model (gptforge.load loads it); best/ the best by the metric

`resume=True` continues exactly from `checkpoints/latest`: the per-step losses equal those of a run
that was never interrupted (same world size, same config). Ctrl-C or SIGTERM stops at the next step
boundary, writes a checkpoint and the model, and returns with `result.interrupted = True`.

With `max_time` (and `time_schedule`, the default) the run is planned in seconds: see `budget`. Its
resume continues the budget where the checkpoint left it (the seconds spent are in the checkpoint), so
a resumed run ends when the whole budget is spent; it is not bit-exact, since step times differ.

The parts, as in torchtitan's trainer: `TrainState` (counters a checkpoint carries), `RunCheckpointer`
(save / load / prune / latest), `Trainer.train_step` (one optimizer step over the micro-batches),
`Trainer.evaluate` (evaluation, best/ and early stopping) and `TimeBudget` (time-budgeted planning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formatting import metric_phrase
from . import distributed as D
from .budget import TimeBudget
from .checkpointing import CHECKPOINT_DIR, LATEST, RunCheckpointer, latest_checkpoint, write_model_folder
from .metrics import MetricsLogger, ProgressBar, estimate_peak_flops, import_plotting, plot_loss_curve
from .optim import OPTIMIZERS, build_optimizer
from .schedule import LRSchedule
from .state import TrainState

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DTYPES = ("auto", "fp32", "bf16", "fp16")


class BatchSource(Protocol):
    """What `train` pulls micro-batches from."""

    def next_batch(self) -> Any: ...  # (input_ids, labels) for the default objective

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """How `train_step` turns micro-batches into a loss: the step minimizes sum(loss) / sum(count)."""

    def count(self, batch: Any) -> int:
        """The units (target tokens, pairs...) that the batch's summed loss covers."""
        ...

    def shape(self, batch: Any) -> tuple[int, int]:
        """(input tokens, sequence length) of the batch, for throughput and MFU."""
        ...

    def loss(self, model: nn.Module, batch: Any,
             autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, summed extra metrics) of one micro-batch; the forward runs under `autocast()`."""
        ...


class TokenCrossEntropy:
    """The default objective: next-token cross-entropy summed over the labels that are not -100."""

    def count(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Target tokens of the batch."""
        return int((batch[1] != IGNORE_INDEX).sum())

    def shape(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[int, int]:
        """(input tokens, sequence length)."""
        return batch[0].numel(), batch[0].shape[1]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed token cross-entropy (in fp32, outside autocast); no extra metrics."""
        x, y = batch
        with autocast():
            logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum"), {}


def batch_to(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a tuple/list/dict of them) moved to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch


@dataclass
class TrainConfig:
    """Optimization, evaluation and checkpointing settings (the `train:` section of a recipe)."""

    max_steps: int = 1000  # optimizer steps (with max_time: an upper bound)
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | wsd | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of steps (or of the time budget) spent in the final decay
    weight_decay: float = 0.1  # on weight matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    grad_accum_steps: int = 0  # micro-batches per step and rank; 0 derives it from batch_tokens (else 1)
    batch_tokens: int = 0  # target tokens per optimizer step over all ranks and micro-batches
    dtype: str = "auto"  # autocast: auto (bf16 on CUDA when supported, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model for training
    fused_adamw: Optional[bool] = None  # None: fused kernel when the device supports it
    optimizer: str = "adamw"  # adamw | muon (Muon on hidden matrices, AdamW on embeddings, head, norms)
    muon_lr: float = 0.02  # peak learning rate of the Muon matrices (train.lr drives the AdamW part)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "auto"  # under torchrun: auto (= ddp) | ddp | fsdp | none
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    early_stopping_metric: str = "val_loss"
    early_stopping_mode: str = "min"  # min | max
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 disables
    early_stopping_min_delta: float = 0.0
    save_best: bool = True  # keep best/ (the model at the best evaluation)
    checkpoint_every: int = 0  # steps between resumable checkpoints (0: only at exit)
    keep_checkpoints: int = 2  # newest step-N folders kept
    log_every: int = 1  # steps between metrics records
    max_time: float = 0.0  # wall-clock budget of the whole run in seconds, across resumes (0: none)
    # With max_time: plan the run in time (lr schedule, evaluations, the last step follow measured speed);
    time_schedule: bool = True  # false: max_time is only a hard stop for a step-based run
    warmup_fraction: float = 0.05  # time budget: warmup share (ends earlier if warmup_steps come first)
    eval_share: float = 0.05  # time budget: most of it that evaluations may take (eval_every: min spacing)
    progress: bool = True  # progress display on rank 0 (a bar on a terminal, periodic lines in logs)
    peak_flops: float = 0.0  # device peak FLOP/s for MFU (0: estimate)
    tensorboard: bool = False
    wandb_project: Optional[str] = None

    @property
    def time_budgeted(self) -> bool:
        """Whether the run is planned in seconds (max_time set and time_schedule on)."""
        return self.max_time > 0 and self.time_schedule

    def validate(self) -> None:
        """Raise ValueError naming the field when a setting is out of range."""
        positive = {"max_steps": self.max_steps, "lr": self.lr, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"train.{name} must be positive, got {value!r}")
        non_negative = {"warmup_steps": self.warmup_steps, "grad_clip": self.grad_clip,
                        "grad_accum_steps": self.grad_accum_steps, "batch_tokens": self.batch_tokens,
                        "eval_every": self.eval_every, "checkpoint_every": self.checkpoint_every,
                        "early_stopping_patience": self.early_stopping_patience, "max_time": self.max_time,
                        "weight_decay": self.weight_decay}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"train.{name} must be >= 0, got {value!r}")
        for name, value in {"warmup_fraction": self.warmup_fraction, "eval_share": self.eval_share}.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.muon_lr > 0:
            raise ValueError(f"train.muon_lr must be positive, got {self.muon_lr!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.early_stopping_mode not in ("min", "max"):
            raise ValueError(f"train.early_stopping_mode must be 'min' or 'max', got {self.early_stopping_mode!r}")
        if self.parallel not in D.PARALLEL_MODES:
            raise ValueError(f"train.parallel must be one of {D.PARALLEL_MODES}, got {self.parallel!r}")
        LRSchedule(self.lr, self.max_steps, self.warmup_steps, self.schedule, self.min_lr_ratio, self.decay_fraction)


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    steps: int = 0
    tokens: int = 0
    last_loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)  # last evaluation
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    stopped_early: bool = False
    interrupted: bool = False
    model_dir: Optional[Path] = None
    best_dir: Optional[Path] = None
    losses: list[float] = field(default_factory=list)  # per step, this session only
    out_of_time: bool = False  # max_time ended the run before max_steps
    elapsed_s: float = 0.0  # wall-clock seconds of the run (all sessions)


@dataclass
class StepOutput:
    """What one optimizer step measured (global over ranks)."""

    loss: float  # mean loss per target token (per the objective's unit)
    grad_norm: float  # before clipping (nan when clipping is off)
    tokens: int  # input tokens of the step
    seq_len: int
    stop_votes: float  # ranks that asked to stop (reduced together with the loss)
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's extra metrics, per unit


class _StopFlag:
    """First Ctrl-C / SIGTERM asks for a clean stop at the next step boundary; a second one interrupts."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stop requested (signal %d): finishing this step and writing a checkpoint; "
                    "press Ctrl-C again to abort without saving", signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.dtype == "fp32":
        return None
    if cfg.dtype == "bf16":
        return torch.bfloat16
    if cfg.dtype == "fp16":
        if device.type != "cuda":
            raise ValueError("train.dtype='fp16' needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPU: fp32 unless asked; bf16 speed on CPUs varies too much to pick it blindly


def _default_save_model(model: nn.Module, directory: Path) -> None:
    """Write `model` as a model folder (no tokenizer: callers that have one pass their own save_model)."""
    from ..loading import save
    from ..model import GPT

    if hasattr(model, "save_pretrained"):  # e.g. a classifier: body and head
        model.save_pretrained(directory)
    elif isinstance(model, GPT):
        save(directory, model)
    else:
        raise TypeError(f"{type(model).__name__} is not a GPT and has no save_pretrained(); pass save_model= "
                        "to train()")


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Trainer:
    """One run of `train`: setup, then `train_step` / `evaluate` / checkpoints over a `TrainState`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, source: BatchSource, run_dir: Path, *,
                 evaluate: Optional[Callable[[nn.Module], dict[str, float]]],
                 save_model: Callable[[nn.Module, Path], None], resume: bool,
                 run_config: Optional[dict[str, Any]], objective: Optional[Objective] = None) -> None:
        self.clock = time.perf_counter()  # the budget counts setup too
        cfg.validate()
        self.cfg, self.source, self.run_dir = cfg, source, run_dir
        self.objective: Objective = objective if objective is not None else TokenCrossEntropy()
        self.evaluate_fn, self.save_model = evaluate, save_model
        self.info = info = D.init_distributed(cfg.device)
        start = self._resume_point(resume)
        self._setup_model(model)
        self.optimizer = build_optimizer(self.bare, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps,
                                         cfg.fused_adamw, kind=cfg.optimizer, muon_lr=cfg.muon_lr)
        self.schedule = LRSchedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                                   cfg.decay_fraction)
        self.state = TrainState(grad_accum_steps=cfg.grad_accum_steps)
        self.checkpointer = RunCheckpointer(
            run_dir, state=self.state, model=self.model_for_step, optimizer=self.optimizer, schedule=self.schedule,
            source=source, info=info, keep=cfg.keep_checkpoints,
            config={"train": dataclasses.asdict(cfg), "run": run_config or {}})
        self.resumed = start is not None
        if start is not None:
            self.checkpointer.load(start)
            if info.is_main:
                log.info("resumed from %s (step %d)", start, self.state.step)
        else:
            _set_seed(cfg.seed + info.rank)
        self.elapsed_before = self.state.elapsed_s
        self.budget = self._make_budget() if cfg.time_budgeted else None
        self.logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                                    wandb_project=cfg.wandb_project, config=dataclasses.asdict(cfg))
        if info.is_main:
            if self.resumed:
                self.logger.truncate_after(self.state.step)
            else:  # a fresh start (also a resume that found no checkpoint): the log starts over
                self.logger.path.unlink(missing_ok=True)
        self.pending = self._derive_accumulation()
        self.result = TrainResult(run_dir=run_dir, steps=self.state.step, tokens=self.state.tokens,
                                  best_metric=self.state.best_metric, best_step=self.state.best_step)
        self.bar = self._make_bar()
        self.last_eval_step = self.state.step if self.resumed else -1
        self.last_eval_seconds = self.state.last_eval_s  # a hard stop (max_time without time_schedule) keeps room

    # ---- setup ---------------------------------------------------------------------------------------

    def _resume_point(self, resume: bool) -> Optional[Path]:
        """The checkpoint to continue from; refuses to overwrite a run that has checkpoints."""
        run_dir = self.run_dir
        if not resume and (run_dir / CHECKPOINT_DIR / LATEST).exists():
            raise ValueError(f"run folder {run_dir} already has checkpoints; pass resume=True (--resume) to continue "
                             "it, or choose another output folder")
        start = latest_checkpoint(run_dir) if resume else None
        if resume and start is None and self.info.is_main:
            log.warning("resume requested but %s has no checkpoint yet; starting from step 0", run_dir)
        return start

    def _setup_model(self, model: nn.Module) -> None:
        """Move to the device, wrap for DDP/FSDP (and compile); pick the autocast dtype."""
        cfg, info = self.cfg, self.info
        self.device = info.device
        model.to(self.device)
        self.bare = model
        self.model_for_step = D.wrap_model(model, info, "ddp" if cfg.parallel == "auto" else cfg.parallel)
        self.fsdp = D.is_fsdp(model)
        self.ddp = self.model_for_step if isinstance(self.model_for_step, nn.parallel.DistributedDataParallel) else None
        if cfg.compile:
            self.model_for_step = torch.compile(self.model_for_step)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.amp_dtype = _autocast_dtype(cfg, self.device)

    def _make_budget(self) -> TimeBudget:
        state = self.state
        # Model and two AdamW moments: what the final checkpoint writes, until one was measured.
        checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in self.bare.parameters())
        return TimeBudget(self.cfg.max_time, self.cfg.eval_share, spent=state.elapsed_s, eval_spent=state.eval_s,
                          progress=state.progress, checkpoint_bytes=checkpoint_bytes, last_eval_s=state.last_eval_s,
                          origin=state.start_s, started=self.clock)

    def _derive_accumulation(self) -> list[Any]:
        """Fix micro-batches per step from train.batch_tokens and the first batch's shape (kept for step 1)."""
        cfg, info, state = self.cfg, self.info, self.state
        if state.grad_accum_steps > 0:
            return []
        first = self.source.next_batch()
        per_micro = self.objective.shape(first)[0] * info.world_size
        accum = max(1, round(cfg.batch_tokens / per_micro)) if cfg.batch_tokens else 1
        if cfg.batch_tokens and accum * per_micro != cfg.batch_tokens and info.is_main:
            log.warning("train.batch_tokens=%d is not a multiple of %d tokens per micro-step; using %d "
                        "micro-batches (%d tokens per step)", cfg.batch_tokens, per_micro, accum, accum * per_micro)
        state.grad_accum_steps = accum
        return [first]

    def _make_bar(self) -> ProgressBar:
        cfg, info = self.cfg, self.info
        peak = cfg.peak_flops or estimate_peak_flops(self.device)
        enabled = cfg.progress and info.is_main
        if self.budget is not None:  # a time budget: the bar counts seconds of it
            return ProgressBar(int(cfg.max_time), int(self.elapsed()), enabled, 0.0, peak, info.is_main, unit="s")
        return ProgressBar(cfg.max_steps, self.state.step, enabled, 0.0, peak, info.is_main)

    def elapsed(self) -> float:
        """Wall-clock seconds of the run, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.clock

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training autocast context (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ---- the parts ---------------------------------------------------------------------------------

    def next_batches(self) -> list[Any]:
        """This rank's micro-batches for one step, on the device."""
        batches = self.pending + [self.source.next_batch()
                                  for _ in range(self.state.grad_accum_steps - len(self.pending))]
        self.pending = []
        return [batch_to(b, self.device) for b in batches]

    def train_step(self, batches: list[Any], stop_requested: bool = False) -> StepOutput:
        """One optimizer step over `batches`: gradients of the summed losses over the global unit count."""
        info, objective = self.info, self.objective
        local_count = sum(objective.count(b) for b in batches)
        global_count = D.all_reduce_sum([float(local_count)], info)[0]
        # Sum-of-token-losses over the global count: equal to one process with more accumulation,
        # also when batches carry different numbers of ignored (-100) labels.
        scale = info.world_size / max(global_count, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            # DDP all-reduces gradients on the last micro-batch only.
            sync = self.ddp is None or i == len(batches) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                unit_loss, metrics = objective.loss(self.model_for_step, batch, self.autocast)
                (unit_loss * scale).backward()
            loss_sum += unit_loss.detach().double()
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().double()
        grad_norm = float("nan")
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        shapes = [objective.shape(b) for b in batches]
        step_tokens = int(D.all_reduce_sum([float(sum(n for n, _ in shapes))], info)[0])
        names = sorted(metric_sums)
        total, stop_votes, *values = D.all_reduce_sum(
            [float(loss_sum), float(stop_requested)] + [float(metric_sums[k]) for k in names], info)
        loss = total / max(global_count, 1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {self.state.step + 1}; lower train.lr or "
                                     "check the data")
        metrics = {k: v / max(global_count, 1.0) for k, v in zip(names, values)}
        return StepOutput(loss, grad_norm, step_tokens, shapes[0][1], stop_votes, metrics)

    def plan_step(self) -> tuple[float, bool]:
        """Set the coming step's learning rate; returns it and whether this step is the run's last."""
        cfg, state, budget = self.cfg, self.state, self.budget
        last = state.step + 1 >= cfg.max_steps
        if budget is None:
            return self.schedule.apply(self.optimizer, state.step), last
        budget.begin_training()
        state.start_s = budget.origin
        progress = 1.0
        if self.info.is_main:  # rank 0's clock decides for everyone
            last = last or budget.last_step_due()
            progress = 1.0 if last else max(budget.progress(), state.step / max(cfg.max_steps - 1, 1))
        progress, last = D.broadcast_object((progress, last), self.info)
        if last:
            budget.finish()
        state.progress = progress
        lr = self.schedule.lr_at_progress(progress, state.step, cfg.warmup_fraction)
        return self.schedule.apply(self.optimizer, state.step, lr=lr), last

    def evaluate(self) -> dict[str, float]:
        """Evaluate the bare model (eval mode, no grad, training autocast); log it, keep best/, count bad evals."""
        self.last_eval_step = self.state.step
        if self.evaluate_fn is None:
            return {}
        started = time.perf_counter()
        was_training = self.bare.training
        self.bare.eval()
        with torch.no_grad(), self.autocast():
            metrics = {k: float(v) for k, v in self.evaluate_fn(self.bare).items()}
        self.bare.train(was_training)
        self.result.metrics = metrics
        self.logger.log({"step": self.state.step, **metrics})
        self.bar.write(f"step {self.state.step}: " + ", ".join(metric_phrase(k, v) for k, v in metrics.items()))
        seconds = time.perf_counter() - started
        self.last_eval_seconds = self.state.last_eval_s = seconds
        wrote = self._book_evaluation(metrics)
        if self.budget is not None:
            self.budget.record_eval(seconds)
            if wrote:
                self.budget.record_model_write(time.perf_counter() - started - seconds)
            self.state.eval_s = self.budget.eval_spent
        return metrics

    def _book_evaluation(self, metrics: dict[str, float]) -> bool:
        """best/ and early stopping: track the watched metric; write best/ on an improvement (returns True)."""
        cfg = self.cfg
        value = metrics.get(cfg.early_stopping_metric)
        if value is None:
            if cfg.early_stopping_patience or cfg.save_best:
                log.debug("evaluate() returned no %r; best/ and early stopping skip this evaluation",
                          cfg.early_stopping_metric)
            return False
        if self.state.record_eval(value, cfg.early_stopping_mode, cfg.early_stopping_min_delta) and cfg.save_best:
            write_model_folder(self.bare, self.run_dir / "best", self.save_model, self.info, self.fsdp)
            self.result.best_dir = self.run_dir / "best"
            return True
        return False

    def draw_loss_curve(self) -> None:
        """loss_curve.png from metrics.jsonl (rank 0)."""
        if self.info.is_main:
            plot_loss_curve(self.logger.path, self.run_dir / "loss_curve.png", title=f"{self.run_dir.name}: loss")

    def checkpoint(self) -> None:
        """Write a resumable checkpoint of the current state."""
        started = time.perf_counter()
        self.state.elapsed_s = self.elapsed()
        self.checkpointer.save()
        if self.budget is not None:
            self.budget.record_save(time.perf_counter() - started)

    # ---- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train until max_steps, the time budget, early stopping or a stop request; then finish the run."""
        cfg, state = self.cfg, self.state
        self.model_for_step.train()
        try:
            with _StopFlag() as stop:
                if self._initial_evaluation_due():
                    self.evaluate()  # the loss of the initial model, the curve's first point
                if self.budget is not None and self.info.is_main:
                    import_plotting()  # a timed run pays matplotlib's import now, not in its final seconds
                # A time-budgeted run whose final step is done (progress 1.0) trains no further on resume.
                while state.step < cfg.max_steps and (self.budget is None or state.progress < 1.0):
                    started = time.perf_counter()
                    lr, last = self.plan_step()
                    out = self.train_step(self.next_batches(), stop.requested)
                    self._book_step(out, lr, started)
                    if self._between_steps(out, last):
                        break
        except KeyboardInterrupt:
            # A second Ctrl-C: the step in flight is lost, the last complete checkpoint stays valid.
            self.result.interrupted = True
            self.bar.close()
            self.logger.close()
            raise
        return self.finish()

    def _initial_evaluation_due(self) -> bool:
        if self.resumed or self.state.step != 0:
            return False
        # A time budget evaluates at the start as well: it measures what an evaluation costs.
        return bool(self.cfg.eval_every) or (self.budget is not None and self.evaluate_fn is not None)

    def _book_step(self, out: StepOutput, lr: float, started: float) -> None:
        """Count the step, log it and move the bar."""
        cfg, state = self.cfg, self.state
        state.step += 1
        state.tokens += out.tokens
        self.result.losses.append(out.loss)
        self.result.steps, self.result.tokens, self.result.last_loss = state.step, state.tokens, out.loss
        dt = time.perf_counter() - started
        tps = out.tokens / max(dt, 1e-9)
        config = getattr(self.bare, "config", None)
        if config is not None and hasattr(config, "flops_per_token"):
            self.bar.flops_per_token = config.flops_per_token(out.seq_len) / max(self.info.world_size, 1)
        position = int(self.elapsed()) if self.budget is not None else None
        mfu = self.bar.update(out.loss, tps / max(self.info.world_size, 1), lr, position=position, step=state.step)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            record = {"step": state.step, "loss": out.loss, "lr": lr, "grad_norm": out.grad_norm,
                      "tokens": state.tokens, "tokens_per_s": tps, "elapsed_s": self.elapsed()}
            record.update(out.metrics)
            if mfu is not None:
                record["mfu"] = mfu
            if self.budget is not None:
                record["progress"] = state.progress
            self.logger.log(record)
        if self.budget is not None:
            self.budget.record_step(time.perf_counter() - started)

    def _between_steps(self, out: StepOutput, last: bool) -> bool:
        """Evaluate and checkpoint when due; True when the run should stop now."""
        cfg, state, result = self.cfg, self.state, self.result
        eval_due, checkpoint_fits = last, True
        if self.budget is not None:
            spaced = bool(cfg.eval_every) and state.step - self.last_eval_step >= cfg.eval_every
            if self.info.is_main:
                eval_due = last or (spaced and self.budget.eval_due())
                checkpoint_fits = self.budget.checkpoint_fits()
            eval_due, checkpoint_fits = D.broadcast_object((eval_due, checkpoint_fits), self.info)
        elif cfg.eval_every and state.step % cfg.eval_every == 0:
            eval_due = True
        if eval_due:
            self.evaluate()
            if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
                result.stopped_early = True
                self.bar.write(f"early stopping at step {state.step}: {cfg.early_stopping_metric} has not improved "
                               f"for {state.bad_evals} evaluations (best {state.best_metric:.4f} at step "
                               f"{state.best_step})")
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and checkpoint_fits:
            self.checkpoint()
        if out.stop_votes > 0:
            result.interrupted = True
        if self.budget is not None:
            result.out_of_time = last and state.step < cfg.max_steps
        elif cfg.max_time:  # a hard stop: keep room for the final evaluation
            result.out_of_time = bool(D.broadcast_object(
                self.elapsed() + self.last_eval_seconds >= cfg.max_time, self.info)) and state.step < cfg.max_steps
        return last or result.stopped_early or result.interrupted or result.out_of_time

    def finish(self) -> TrainResult:
        """Final evaluation and checkpoint, model/, the loss curve; says how the run ended."""
        state, result, info = self.state, self.result, self.info
        if self.last_eval_step != state.step and not result.interrupted:
            self.evaluate()  # out of time: the final model gets its evaluation (an interrupted run resumes instead)
        if self.checkpointer.last_saved_step != state.step:
            self.checkpoint()
        write_model_folder(self.bare, self.run_dir / "model", self.save_model, info, self.fsdp)
        result.model_dir = self.run_dir / "model"
        result.best_metric, result.best_step = state.best_metric, state.best_step
        self.draw_loss_curve()
        result.elapsed_s = self.elapsed()
        self.bar.close(position=int(result.elapsed_s) if self.budget is not None else None)
        if result.out_of_time:
            self.bar.write(self._budget_summary())
        self.logger.close()
        D.barrier(info)
        return result

    def _budget_summary(self) -> str:
        """One sentence on how the time budget ended the run."""
        cfg, state = self.cfg, self.state
        done = (f"{state.step:,} steps (train.max_steps {cfg.max_steps:,} not reached), {state.tokens:,} tokens, "
                f"{self.result.elapsed_s:.0f} s of the {cfg.max_time:.0f} s budget")
        if self.budget is not None:
            return (f"time budget used: trained {done}; the learning rate decayed to its final value "
                    f"{self.optimizer.param_groups[0]['lr']:.2e}")
        return (f"train.max_time cut training short after {done}; the learning-rate schedule had not finished "
                "(time_schedule: true plans the schedule in time)")


def train(model: nn.Module, cfg: TrainConfig, train_source: BatchSource, out_dir: str | Path, *,
          evaluate: Optional[Callable[[nn.Module], dict[str, float]]] = None,
          save_model: Optional[Callable[[nn.Module, Path], None]] = None,
          resume: bool = False, run_config: Optional[dict[str, Any]] = None,
          objective: Optional[Objective] = None) -> TrainResult:
    """Train `model` on batches from `train_source`, writing metrics, checkpoints and models to `out_dir`.

    Returns a `TrainResult`. See the module docstring for the batch-source protocol, the run folder
    layout and the resume guarantee. `run_config` (e.g. the recipe) is stored in each checkpoint;
    `objective` computes the loss (default: `TokenCrossEntropy`).
    """
    trainer = Trainer(model, cfg, train_source, Path(out_dir), evaluate=evaluate,
                      save_model=save_model or _default_save_model, resume=resume, run_config=run_config,
                      objective=objective)
    return trainer.run()


__all__ = ["TrainConfig", "TrainResult", "BatchSource", "Objective", "TokenCrossEntropy", "Trainer", "TrainState",
           "train", "latest_checkpoint", "batch_to", "IGNORE_INDEX"]
