"""Loading and saving model directories: the one home for model + tokenizer I/O.

    model, tokenizer = load("runs/demo/model")            # ours, Hugging Face's, or a quantized one
    save("out/model", model, tokenizer)                   # plain or quantized, chosen from the model

A model directory is a Hugging Face directory: `config.json` (with our exact `Config` under the key
"gptforge"), `model.safetensors` (or sharded with an index) and the tokenizer files. `interop/hf.py`
maps configs and weight names; `compress/quantize.py` rebuilds quantized linears; this module reads
and checks the files and puts the pieces together. The model never reads files itself.

Every tensor's name and shape is checked against the safetensors headers before any memory is
allocated, so a damaged or mismatched directory fails at once with the tensor it lacks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import atomic_write_text
from .checkpoint import load_state_into, load_tensors, save_tensors
from .config import Config
from .errors import CheckpointError
from .interop import hf
from .model import GPT
from .tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
# Building a model this large with random init costs seconds that the checkpoint overwrites anyway;
# smaller ones build directly, because the first meta-device op costs a 1.5 s one-off import.
EMPTY_INIT_MIN_PARAMS = 20_000_000
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """`device`, or CUDA when present and none is given; a CUDA request on a machine without it is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r}: CUDA is not available on this machine (use cpu)")
    return torch.device(device)


def resolve_dtype(dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """A torch dtype from a name ("bf16", "float32", ...), a torch dtype, or None (keep what is saved)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


# ---- building -----------------------------------------------------------------------------------

def build_model(config: Config, device: str | torch.device = "cpu", *, empty: bool = False) -> GPT:
    """A GPT for `config` on `device`; `empty=True` skips the random init (for weights loaded right after)."""
    if not empty:
        return GPT(config).to(device)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    model.reset_tables(torch.device(device))  # non-persistent tables are not in checkpoints: recompute them
    return model


# ---- reading ------------------------------------------------------------------------------------

def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a model directory as a dict."""
    file = directory / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a model directory written by gptforge or a "
                              "Hugging Face checkpoint)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: invalid index (expected a 'weight_map'): {exc}") from exc
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: shard file(s) {absent[:3]} listed but not found")
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory}: only pickle weights (*.bin/*.pt) found; gptforge loads safetensors only "
                              "(convert with `transformers` once: model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the directory's safetensors files, read from the headers only."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file: {exc}") from exc
    return shapes


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        state.update(load_tensors(file))
    return state


_LAYER = re.compile(r"(?:^|\.)(?:h|layers|blocks)\.(\d+)\.")


def _check_size(directory: Path, config: Config, shapes: dict[str, tuple[int, ...]], quantized: bool) -> None:
    """Cheap checks before anything is built: the layer count and the parameter count match the files."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER.search(name))}
    if layers != set(range(config.n_layer)):
        absent = sorted(set(range(config.n_layer)) - layers)
        if absent:
            raise CheckpointError(f"{directory}: config.json describes {config.n_layer} layers but the weights have "
                                  f"no tensors for layer {absent[0]}" + (f" (and {len(absent) - 1} more layers)"
                                                                        if len(absent) > 1 else ""))
        raise CheckpointError(f"{directory}: the weights hold layers up to {max(layers)} but config.json describes "
                              f"{config.n_layer}")
    held = sum(math.prod(s) for s in shapes.values())
    if not quantized and config.num_params() > 1.05 * held + 1024:  # packed int4 holds fewer elements
        raise CheckpointError(f"{directory}: config.json describes {config.num_params():,} parameters but the weights "
                              f"hold {held:,}; the config does not belong to these weights")


def _check_shapes(directory: Path, model: GPT, family: Optional[str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the model needs is in the files with the same shape (names the first that is not)."""
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = hf.state_to_hf(state, model.config, family) if family else state
    if family == "gpt2" and not any(k.startswith("transformer.") for k in shapes):
        shapes = {("" if k.startswith("lm_head.") else "transformer.") + k: v for k, v in shapes.items()}
    for name, tensor in expected.items():
        if name not in shapes:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing from the weights")
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {shapes[name]} in the weights but "
                                  f"config.json implies {tuple(tensor.shape)}")


def load_tokenizer(path: str | Path) -> Optional[Tokenizer]:
    """The tokenizer saved in a model directory, or None when it has no tokenizer.json."""
    directory = Path(path)
    return Tokenizer.from_file(directory) if (directory / TOKENIZER_FILE).is_file() else None


def _check_tokenizer(directory: Path, tokenizer: Tokenizer, config: Config) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"vocabulary is {config.vocab_size}; they do not belong together")


def load_model(path: str | Path, *, dtype: Optional[str | torch.dtype] = None,
               device: str | torch.device = "cpu") -> GPT:
    """The model of a directory (ours, Hugging Face's or quantized), in eval mode."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"model directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; expected a model directory (config.json, model.safetensors)")
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    hf_config = read_config(directory)
    config = hf.config_from_hf(hf_config, source=str(directory / "config.json"))
    native = hf.NATIVE_ARCHITECTURE in (hf_config.get("architectures") or []) or bool(
        hf_config.get("quantization_config"))
    family = None if native else hf.hf_family(config)
    quantized = bool(hf_config.get("quantization_config"))
    shapes = tensor_shapes(directory)
    _check_size(directory, config, shapes, quantized)
    model = build_model(config, device, empty=quantized or config.num_params() > EMPTY_INIT_MIN_PARAMS)
    if not quantized:  # quantized tensors have their own layouts: load_state_into checks them by name
        _check_shapes(directory, model, family, shapes)
    tensors = read_weights(directory)
    if hf_config.get("quantization_config"):
        from .compress.quantize import load_quantized_into

        model = load_quantized_into(model, hf_config["quantization_config"], tensors, dtype, source=str(directory))
    else:
        state = hf.state_from_hf(tensors, config, family) if family else dict(tensors)
        if config.tie_embeddings:
            state["lm_head.weight"] = state["wte.weight"]
        load_state_into(model, state, source=str(directory))
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        if dtype is not None:
            model = model.to(dtype)
    return model.eval()


def load(path: str | Path, *, dtype: Optional[str | torch.dtype] = None,
         device: str | torch.device = "cpu") -> tuple[GPT, Optional[Tokenizer]]:
    """(model, tokenizer) of a model directory; the tokenizer is None when the directory has none."""
    model = load_model(path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(path)
    if tokenizer is not None:
        _check_tokenizer(Path(path), tokenizer, model.config)
    return model, tokenizer


# ---- writing ------------------------------------------------------------------------------------

def save(path: str | Path, model: GPT, tokenizer: Optional[Tokenizer] = None) -> Path:
    """Write config.json + model.safetensors + generation_config.json (+ tokenizer files) into `path`.

    A plain model gets Hugging Face names, so `transformers` loads the directory; a quantized one keeps
    gptforge names and a `quantization_config` (only gptforge loads it).
    """
    from .compress.quantize import is_quantized, quantized_checkpoint

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    hf_config = hf.config_to_hf(config)
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    if len(dtypes) == 1:
        hf_config["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "")
    if is_quantized(model):
        extra, state = quantized_checkpoint(model)
        hf_config.update(extra)
    else:
        state = dict(model.state_dict())
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        family = hf.hf_family(config)
        state = hf.state_to_hf(state, config, family) if family else state
    save_tensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2))
    generation = {k: v for k, v in {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                                    "pad_token_id": config.pad_token_id}.items() if v is not None}
    atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


__all__ = ["load", "load_model", "load_tokenizer", "save", "build_model", "read_config", "read_weights",
           "tensor_shapes", "resolve_dtype", "resolve_device", "DTYPES"]
