"""The checkpoints of one run: `checkpoints/step-N/` folders, the `latest` pointer, and model folders.

A checkpoint folder holds
    model.safetensors     full model state (gathered under FSDP)
    optimizer.*           optimizer state (safetensors + JSON skeleton)
    ranks.*               per-rank RNG states and data positions
    config.json           {"train": TrainConfig, "run": the run's config (e.g. the recipe)}
    trainer.*             TrainState counters, world size and schedule; written last, so its presence
                          marks a complete folder
Folders are written with `atomic_directory` and `latest` is replaced by an atomic rename afterwards, so a
kill mid-write leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..atomic import atomic_directory, atomic_write_text
from ..checkpoint import (CheckpointError, capture_rng_state, load_state, load_tensors, restore_rng_state,
                          save_state, save_tensors)
from . import distributed as D
from .schedule import LRSchedule
from .state import TrainState

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


class RunCheckpointer:
    """Saves and restores everything a run needs to continue exactly: state, model, optimizer, schedule, data.

    The parts are given once; `save()` writes `checkpoints/step-N` for the state's current step and
    `load(path)` restores them all. Every rank calls both (they gather and barrier).
    """

    def __init__(self, run_dir: Path, *, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: LRSchedule, source: Any, info: D.DistInfo, keep: int,
                 config: Optional[dict[str, Any]] = None) -> None:
        self.root = Path(run_dir) / CHECKPOINT_DIR
        self.state, self.model, self.optimizer, self.schedule, self.source = state, model, optimizer, schedule, source
        self.info, self.keep, self.config = info, keep, config or {}
        self.last_saved_step: Optional[int] = None

    def has_checkpoints(self) -> bool:
        """Whether the run folder already has a `latest` pointer."""
        return (self.root / LATEST).exists()

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.root.parent)

    def save(self) -> Path:
        """Write checkpoints/step-N atomically, point `latest` at it and prune old ones (rank 0 writes)."""
        info = self.info
        model_state = D.full_model_state(self.model)
        optim_state = D.optimizer_state(self.model, self.optimizer)
        ranks = self._gather({"rng": capture_rng_state(), "data": self.source.state_dict()})
        name = f"step-{self.state.step:08d}"
        path = self.root / name
        if info.is_main:
            trainer = {**self.state.state_dict(), "world_size": info.world_size,
                       "schedule": self.schedule.state_dict()}
            with atomic_directory(path) as tmp:
                save_tensors(model_state, tmp / "model.safetensors")
                save_state(optim_state, tmp, "optimizer")
                save_state({"ranks": ranks}, tmp, "ranks")
                atomic_write_text(tmp / "config.json", json.dumps(self.config, indent=2, default=str))
                save_state(trainer, tmp, "trainer")  # last: its presence marks a complete folder
            atomic_write_text(self.root / LATEST, name + "\n")
            self.prune(protect=path)
        D.barrier(info)
        self.last_saved_step = self.state.step
        return path

    def load(self, path: Path) -> None:
        """Restore everything `save` wrote into the state, model, optimizer, schedule, data source and RNG."""
        trainer = load_state(path, "trainer")
        saved_world = int(trainer.get("world_size", 1))
        if saved_world != self.info.world_size:
            raise CheckpointError(f"{path} was written by {saved_world} process(es); resume it with the same number "
                                  f"(got {self.info.world_size}) so the data order and RNG continue exactly")
        D.load_full_model_state(self.model, load_tensors(path / "model.safetensors"))
        D.load_optimizer_state(self.model, self.optimizer, load_state(path, "optimizer"))
        self.schedule.load_state_dict(trainer["schedule"])
        self.state.load_state_dict(trainer)
        rank_state = load_state(path, "ranks")["ranks"][self.info.rank]
        self.source.load_state_dict(rank_state["data"])
        restore_rng_state(rank_state["rng"])
        self.last_saved_step = self.state.step

    def prune(self, protect: Path) -> None:
        """Keep the newest `keep` step folders (never `protect`); drop leftovers of killed writes."""
        steps = sorted((int(m.group(1)), p) for p in self.root.iterdir()
                       if p.is_dir() and (m := _STEP_DIR.match(p.name)))
        for _, path in steps[:-self.keep]:
            if path != protect:
                shutil.rmtree(path, ignore_errors=True)
        # Leftovers of writes killed mid-way (atomic_directory temp folders) are garbage.
        for path in self.root.glob(".step-*"):
            shutil.rmtree(path, ignore_errors=True)

    def _gather(self, rank_state: dict[str, Any]) -> Optional[list[Any]]:
        """Every rank's RNG and data position, on rank 0 (None elsewhere)."""
        if not self.info.enabled:
            return [rank_state]
        gathered: Optional[list[Any]] = [None] * self.info.world_size if self.info.is_main else None
        torch.distributed.gather_object(rank_state, gathered, dst=0)
        return gathered


def write_model_folder(bare: nn.Module, directory: Path, save_model: Callable[[nn.Module, Path], None],
                       info: D.DistInfo, fsdp: bool) -> None:
    """Write a model folder atomically from rank 0 (gathering shards first under FSDP)."""
    target = bare
    if fsdp:
        full = D.full_model_state(bare)  # collective
        if info.is_main:
            target = type(bare)(bare.config)
            target.load_state_dict(full)
    if info.is_main:
        with atomic_directory(directory) as tmp:
            save_model(target, tmp)
    D.barrier(info)


__all__ = ["RunCheckpointer", "latest_checkpoint", "write_model_folder", "CHECKPOINT_DIR", "LATEST"]
