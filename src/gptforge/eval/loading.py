"""Loading a model directory for evaluation (kept apart from the harness so lm-eval loads only when used)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from ..model import GPT
    from ..tokenizer import Tokenizer


def load_model_and_tokenizer(path: str | Path, *, device: Optional[str] = None,
                             dtype: Optional[str] = None) -> tuple["GPT", "Tokenizer"]:
    """A saved gptforge/HF model directory and its tokenizer, in eval mode on `device` (default: cuda if present)."""
    from ..model import GPT
    from ..tokenizer import Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model: no such model directory: {path}")
    dtypes = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    model = GPT.from_pretrained(path, dtype=dtypes[dtype], device=device)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json beside the model; evaluation needs the tokenizer")
        tokenizer = Tokenizer.from_file(path)
    return model.eval(), tokenizer
