"""Data parallelism applied from outside the model: DDP (gloo on CPU, nccl on GPU) or FSDP2 `fully_shard`.

Launch with `torchrun --nproc_per_node N ...`; torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, which
`init_distributed` reads. Without them everything runs as a single process and these helpers are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> this process's GPU when there is one, else CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={requested!r} but CUDA is not available on this machine")
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "auto") -> nn.Module:
    """Return the module to train: the model itself, DDP around it, or the model sharded in place by FSDP2."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if not info.enabled or mode == "none":
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Each Transformer block is its own unit, so only one block's full weights exist at a time.
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2 (its parameters are DTensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False  # FSDP needs a process group; skip importing DTensor (slow) otherwise
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of the bare model (collective under FSDP: every rank must call it)."""
    bare = unwrap(model)
    if is_fsdp(bare):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(bare, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in bare.state_dict().items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into the (possibly sharded) bare model."""
    bare = unwrap(model)
    if is_fsdp(bare):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(bare, state, options=StateDictOptions(full_state_dict=True))
        return
    bare.load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state to checkpoint (gathered to full tensors under FSDP)."""
    bare = unwrap(model)
    if is_fsdp(bare):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(bare, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`."""
    bare = unwrap(model)
    if is_fsdp(bare):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(bare, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over all ranks (float64, so the totals match a single process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: Optional[DistInfo]) -> None:
    """Leave the process group (safe to call twice)."""
    if info is not None and info.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistInfo", "PARALLEL_MODES", "init_distributed", "wrap_model", "unwrap", "is_fsdp", "full_model_state",
           "load_full_model_state", "optimizer_state", "load_optimizer_state", "all_reduce_sum", "broadcast_object",
           "barrier", "shutdown", "pick_device"]
