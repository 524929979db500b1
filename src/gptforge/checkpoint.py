"""Checkpoints: safetensors weights, JSON state, RNG, optimizer; atomic, with clear errors.

Nothing here unpickles: nested state (optimizer, scheduler, data position) is split into tensors,
stored with safetensors, and a JSON skeleton that says where each tensor goes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, atomic_path, atomic_write_text, read_json


from .errors import CheckpointError  # noqa: E402  (re-exported: gptforge.checkpoint.CheckpointError)


# ---- weights ---------------------------------------------------------------------------------

def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict[str, str]] = None) -> None:
    """Save tensors to a safetensors file atomically (shared storage is de-duplicated by cloning)."""
    ready = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(ready, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or truncated file gives a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {exc}") from exc


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = True) -> None:
    """Copy `state` into `module`, naming missing/unexpected keys and shape mismatches on error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=strict)


# ---- nested state without pickle ----------------------------------------------------------------

def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dict/list state into a JSON skeleton and a flat tensor dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(node))
            return {"__ndarray__": path}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        if isinstance(node, (np.integer, np.floating)):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store object of type {type(node).__name__} at {path or 'root'}")

    return walk(obj, prefix or "s"), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(state: Any, directory: str | Path, name: str) -> None:
    """Save nested state as `<name>.safetensors` + `<name>.json` in `directory`."""
    skeleton, tensors = flatten_state(state)
    directory = Path(directory)
    save_tensors(tensors, directory / f"{name}.safetensors")
    atomic_write_text(directory / f"{name}.json", json.dumps(skeleton))


def load_state(directory: str | Path, name: str) -> Any:
    """Load state written by `save_state`."""
    directory = Path(directory)
    meta = directory / f"{name}.json"
    skeleton = read_json(meta, CheckpointError, f"checkpoint file not found: {meta}")
    return unflatten_state(skeleton, load_tensors(directory / f"{name}.safetensors"))


# ---- RNG ------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, storable with `save_state`."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by `capture_rng_state`."""
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


__all__ = ["CheckpointError", "save_tensors", "load_tensors", "load_state_into", "flatten_state", "unflatten_state",
           "save_state", "load_state", "capture_rng_state", "restore_rng_state", "atomic_directory"]
