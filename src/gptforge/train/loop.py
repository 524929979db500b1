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

`evaluate(model) -> dict[str, float]` runs on every rank with the bare model in eval mode, under
`torch.no_grad()` and the training autocast; early stopping watches `cfg.early_stopping_metric`.
`save_model(model, directory)` writes a model folder (default: `model.save_pretrained(directory)`,
which also saves `model.tokenizer` when set); LoRA passes a function that saves adapters instead.
Only parameters with `requires_grad` are optimized.

The run folder gets:
    metrics.jsonl          one record per step (loss, lr, grad_norm, tokens, tokens_per_s, mfu)
                           and per evaluation (the evaluate() keys)
    loss_curve.png         train and eval losses
    checkpoints/step-N/    model.safetensors, optimizer.*, trainer.* (step, schedule, best metric,
                           per-rank RNG and data position), config.json; written with
                           `atomic_directory`, so a kill mid-write leaves the previous one intact
    checkpoints/latest     name of the newest complete checkpoint (replaced by atomic rename)
    model/                 the final model (GPT.from_pretrained loads it); best/ the best by the metric

`resume=True` continues exactly from `checkpoints/latest`: the per-step losses equal those of a run
that was never interrupted (same world size, same config). Ctrl-C or SIGTERM stops at the next step
boundary, writes a checkpoint and the model, and returns with `result.interrupted = True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import shutil
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

from ..atomic import atomic_directory, atomic_write_text
from ..checkpoint import (CheckpointError, capture_rng_state, load_state, load_tensors, restore_rng_state,
                          save_state, save_tensors)
from . import distributed as D
from .metrics import MetricsLogger, ProgressBar, estimate_peak_flops, plot_loss_curve
from .optim import OPTIMIZERS, build_optimizer
from .schedule import LRSchedule

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DTYPES = ("auto", "fp32", "bf16", "fp16")


class BatchSource(Protocol):
    """What `train` pulls micro-batches from."""

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """Optimization, evaluation and checkpointing settings (the `train:` section of a recipe)."""

    max_steps: int = 1000  # optimizer steps
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | wsd | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: share of steps spent in the final decay
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
    max_time: float = 0.0  # wall-clock budget in seconds, final evaluation included (0: none)
    # With max_time set, the lr schedule can follow elapsed time as well as steps,
    time_schedule: bool = False  # so the decay completes inside the budget (resume is then not bit-exact)
    progress: bool = True  # tqdm bar on rank 0
    peak_flops: float = 0.0  # device peak FLOP/s for MFU (0: estimate)
    tensorboard: bool = False
    wandb_project: Optional[str] = None

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


# ---- checkpoints ---------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, or None."""
    ckpt_root = Path(run_dir) / CHECKPOINT_DIR
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    path = ckpt_root / name
    if not _STEP_DIR.match(name) or not (path / "trainer.json").is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint folder")
    return path


def _prune_checkpoints(ckpt_root: Path, keep: int, protect: Path) -> None:
    steps = sorted((int(m.group(1)), p) for p in ckpt_root.iterdir()
                   if p.is_dir() and (m := _STEP_DIR.match(p.name)))
    for _, path in steps[:-keep]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)
    # Leftovers of writes killed mid-way (atomic_directory temp folders) are garbage.
    for path in ckpt_root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


# ---- the loop ------------------------------------------------------------------------------------

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
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(); pass save_model= to train()")
    model.save_pretrained(directory)


def _set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def train(model: nn.Module, cfg: TrainConfig, train_source: BatchSource, out_dir: str | Path, *,
          evaluate: Optional[Callable[[nn.Module], dict[str, float]]] = None,
          save_model: Optional[Callable[[nn.Module, Path], None]] = None,
          resume: bool = False, run_config: Optional[dict[str, Any]] = None) -> TrainResult:
    """Train `model` on batches from `train_source`, writing metrics, checkpoints and models to `out_dir`.

    Returns a `TrainResult`. See the module docstring for the batch-source protocol, the run folder
    layout and the resume guarantee. `run_config` (e.g. the recipe) is stored in each checkpoint.
    """
    cfg.validate()
    run_dir = Path(out_dir)
    info = D.init_distributed(cfg.device)
    save_model = save_model or _default_save_model
    ckpt_root = run_dir / CHECKPOINT_DIR
    start_ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and (ckpt_root / LATEST).exists():
        raise ValueError(f"run folder {run_dir} already has checkpoints; pass resume=True (--resume) to continue "
                         "it, or choose another output folder")
    if resume and start_ckpt is None and info.is_main:
        log.warning("resume requested but %s has no checkpoint yet; starting from step 0", run_dir)

    device = info.device
    model.to(device)
    bare = model
    model_for_step = D.wrap_model(model, info, "ddp" if cfg.parallel == "auto" else cfg.parallel)
    fsdp = D.is_fsdp(bare)
    ddp = model_for_step if isinstance(model_for_step, nn.parallel.DistributedDataParallel) else None
    if cfg.compile:
        model_for_step = torch.compile(model_for_step)
    optimizer = build_optimizer(bare, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps, cfg.fused_adamw,
                                kind=cfg.optimizer, muon_lr=cfg.muon_lr)
    schedule = LRSchedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio, cfg.decay_fraction)
    params = [p for p in bare.parameters() if p.requires_grad]
    amp_dtype = _autocast_dtype(cfg, device)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # ---- state that a checkpoint carries ----
    step, tokens_seen, accum = 0, 0, cfg.grad_accum_steps
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals = 0
    if start_ckpt is not None:
        step, tokens_seen, accum, best_metric, best_step, bad_evals = _load_checkpoint(
            start_ckpt, model_for_step, optimizer, schedule, train_source, info)
        if info.is_main:
            log.info("resumed from %s (step %d)", start_ckpt, step)
    else:
        _set_seed(cfg.seed + info.rank)

    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, config=dataclasses.asdict(cfg))
    if info.is_main:
        if start_ckpt is not None:
            logger.truncate_after(step)
        else:  # a fresh start (also a resume that found no checkpoint): the log starts over
            logger.path.unlink(missing_ok=True)

    # Micro-batches per step: fixed, or derived from the target tokens and the first batch's shape.
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    if accum <= 0:
        first = train_source.next_batch()
        pending.append(first)
        per_micro = first[0].numel() * info.world_size
        accum = max(1, round(cfg.batch_tokens / per_micro)) if cfg.batch_tokens else 1
        if cfg.batch_tokens and accum * per_micro != cfg.batch_tokens and info.is_main:
            log.warning("train.batch_tokens=%d is not a multiple of %d tokens per micro-step; using %d "
                        "micro-batches (%d tokens per step)", cfg.batch_tokens, per_micro, accum, accum * per_micro)

    config = getattr(bare, "config", None)
    peak = cfg.peak_flops or estimate_peak_flops(device)
    result = TrainResult(run_dir=run_dir, steps=step, tokens=tokens_seen, best_metric=best_metric, best_step=best_step)
    bar = ProgressBar(cfg.max_steps, step, cfg.progress and info.is_main, 0.0, peak, info.is_main)
    started = time.perf_counter()
    last_eval_step = step if start_ckpt is not None else -1
    last_ckpt_step = step if start_ckpt is not None else -1

    eval_seconds = 0.0  # duration of the last evaluation: a time budget keeps room for the final one

    def run_eval() -> dict[str, float]:
        nonlocal best_metric, best_step, bad_evals, last_eval_step, eval_seconds
        last_eval_step = step
        if evaluate is None:
            return {}
        was_training = bare.training
        bare.eval()
        eval_start = time.perf_counter()
        with torch.no_grad(), autocast():
            metrics = {k: float(v) for k, v in evaluate(bare).items()}
        eval_seconds = time.perf_counter() - eval_start
        bare.train(was_training)
        result.metrics = metrics
        logger.log({"step": step, **metrics})
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        value = metrics.get(cfg.early_stopping_metric)
        if value is None:
            if cfg.early_stopping_patience or cfg.save_best:
                log.debug("evaluate() returned no %r; best/ and early stopping skip this evaluation",
                          cfg.early_stopping_metric)
            return metrics
        sign = 1.0 if cfg.early_stopping_mode == "min" else -1.0
        if best_metric is None or sign * (best_metric - value) > cfg.early_stopping_min_delta:
            best_metric, best_step, bad_evals = value, step, 0
            if cfg.save_best:
                _write_model(bare, run_dir / "best", save_model, info, fsdp)
                result.best_dir = run_dir / "best"
        else:
            bad_evals += 1
        return metrics

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        last_ckpt_step = step
        _save_checkpoint(ckpt_root, step, tokens_seen, accum, best_metric, best_step, bad_evals, model_for_step,
                         optimizer, schedule, train_source, info, cfg, run_config)

    model_for_step.train()
    try:
        with _StopFlag() as stop:
            if cfg.eval_every and step == 0 and start_ckpt is None:
                run_eval()  # the loss of the initial model, the curve's first point
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                fraction = None
                if cfg.time_schedule and cfg.max_time:
                    elapsed = D.broadcast_object(time.perf_counter() - started, info)
                    fraction = max(step / cfg.max_steps, elapsed / max(cfg.max_time - eval_seconds, 1e-9))
                lr = schedule.apply(optimizer, step, fraction)
                batches = pending + [train_source.next_batch() for _ in range(accum - len(pending))]
                pending = []
                batches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]
                local_count = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
                global_count = D.all_reduce_sum([float(local_count)], info)[0]
                # Sum-of-token-losses over the global count: equal to one process with more accumulation,
                # also when batches carry different numbers of ignored (-100) labels.
                scale = info.world_size / max(global_count, 1.0)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for i, (x, y) in enumerate(batches):
                    # DDP all-reduces gradients on the last micro-batch only.
                    sync = ddp is None or i == len(batches) - 1
                    ctx = contextlib.nullcontext() if sync else ddp.no_sync()
                    with ctx:
                        with autocast():
                            logits = model_for_step(x)
                        token_loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
                        (token_loss * scale).backward()
                    loss_sum += token_loss.detach().double()
                grad_norm = float("nan")
                if cfg.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_tokens = int(D.all_reduce_sum([float(sum(x.numel() for x, _ in batches))], info)[0])
                tokens_seen += step_tokens
                total, stop_votes = D.all_reduce_sum([float(loss_sum), float(stop.requested)], info)
                loss = total / max(global_count, 1.0)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {step}; lower train.lr or "
                                             "check the data")
                result.losses.append(loss)
                dt = time.perf_counter() - t0
                tps = step_tokens / max(dt, 1e-9)
                if config is not None and hasattr(config, "flops_per_token"):
                    bar.flops_per_token = config.flops_per_token(batches[0][0].shape[1]) / max(info.world_size, 1)
                mfu = bar.update(loss, tps / max(info.world_size, 1), lr)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen,
                              "tokens_per_s": tps, "elapsed_s": time.perf_counter() - started}
                    if mfu is not None:
                        record["mfu"] = mfu
                    logger.log(record)
                result.steps, result.tokens, result.last_loss = step, tokens_seen, loss
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                    run_eval()
                    if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                        result.stopped_early = True
                        bar.write(f"early stopping at step {step}: {cfg.early_stopping_metric} has not improved "
                                  f"for {bad_evals} evaluations (best {best_metric:.4f} at step {best_step})")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
                out_of_time = cfg.max_time and D.broadcast_object(
                    time.perf_counter() - started + eval_seconds >= cfg.max_time, info)
                if stop_votes > 0:
                    result.interrupted = True
                if result.stopped_early or result.interrupted or out_of_time:
                    break
    except KeyboardInterrupt:
        # A second Ctrl-C: the step in flight is lost, the last complete checkpoint stays valid.
        result.interrupted = True
        bar.close()
        logger.close()
        raise
    bar.close()
    if last_eval_step != step and not result.interrupted:
        run_eval()  # out of time: the final model gets its evaluation (an interrupted run resumes instead)
    if last_ckpt_step != step:
        checkpoint()
    _write_model(bare, run_dir / "model", save_model, info, fsdp)
    result.model_dir = run_dir / "model"
    result.best_metric, result.best_step = best_metric, best_step
    if info.is_main:
        plot_loss_curve(logger.path, run_dir / "loss_curve.png", title=f"{run_dir.name}: loss")
    logger.close()
    D.barrier(info)
    return result


def _write_model(bare: nn.Module, directory: Path, save_model: Callable[[nn.Module, Path], None], info: D.DistInfo,
                 fsdp: bool) -> None:
    """Write a model folder atomically from rank 0 (gathering shards first under FSDP)."""
    target = bare
    if fsdp:
        full = D.full_model_state(bare)  # collective
        if info.is_main:
            target = type(bare)(bare.config)
            target.load_state_dict(full)
            if hasattr(bare, "tokenizer"):
                target.tokenizer = bare.tokenizer
    if info.is_main:
        with atomic_directory(directory) as tmp:
            save_model(target, tmp)
    D.barrier(info)


def _save_checkpoint(ckpt_root: Path, step: int, tokens: int, accum: int, best_metric: Optional[float],
                     best_step: Optional[int], bad_evals: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     schedule: LRSchedule, source: BatchSource, info: D.DistInfo, cfg: TrainConfig,
                     run_config: Optional[dict[str, Any]]) -> Path:
    """Write checkpoints/step-N atomically, then point `latest` at it (rank 0 writes; all ranks gather)."""
    model_state = D.full_model_state(model)
    optim_state = D.optimizer_state(model, optimizer)
    rank_state = {"rng": capture_rng_state(), "data": source.state_dict()}
    if info.enabled:
        gathered: Optional[list[Any]] = [None] * info.world_size if info.is_main else None
        torch.distributed.gather_object(rank_state, gathered, dst=0)
        ranks = gathered
    else:
        ranks = [rank_state]
    name = f"step-{step:08d}"
    path = ckpt_root / name
    if info.is_main:
        trainer = {"step": step, "tokens": tokens, "grad_accum_steps": accum, "best_metric": best_metric,
                   "best_step": best_step, "bad_evals": bad_evals, "world_size": info.world_size,
                   "schedule": schedule.state_dict()}
        with atomic_directory(path) as tmp:
            save_tensors(model_state, tmp / "model.safetensors")
            save_state(optim_state, tmp, "optimizer")
            save_state({"ranks": ranks}, tmp, "ranks")
            atomic_write_text(tmp / "config.json", json.dumps(
                {"train": dataclasses.asdict(cfg), "run": run_config or {}}, indent=2, default=str))
            # trainer.json last: its presence marks a complete folder.
            save_state(trainer, tmp, "trainer")
        atomic_write_text(ckpt_root / LATEST, name + "\n")
        _prune_checkpoints(ckpt_root, cfg.keep_checkpoints, path)
    D.barrier(info)
    return path


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                     source: BatchSource, info: D.DistInfo) -> tuple[int, int, int, Optional[float], Optional[int], int]:
    """Restore everything `_save_checkpoint` wrote; returns the loop counters."""
    trainer = load_state(path, "trainer")
    saved_world = int(trainer.get("world_size", 1))
    if saved_world != info.world_size:
        raise CheckpointError(f"{path} was written by {saved_world} process(es); resume it with the same number "
                              f"(got {info.world_size}) so the data order and RNG continue exactly")
    D.load_full_model_state(model, load_tensors(path / "model.safetensors"))
    D.load_optimizer_state(model, optimizer, load_state(path, "optimizer"))
    schedule.load_state_dict(trainer["schedule"])
    rank_state = load_state(path, "ranks")["ranks"][info.rank]
    source.load_state_dict(rank_state["data"])
    restore_rng_state(rank_state["rng"])
    return (int(trainer["step"]), int(trainer["tokens"]), int(trainer["grad_accum_steps"]), trainer["best_metric"],
            trainer["best_step"], int(trainer["bad_evals"]))


__all__ = ["TrainConfig", "TrainResult", "BatchSource", "train", "latest_checkpoint", "IGNORE_INDEX"]
