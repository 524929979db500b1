"""Classification head: a linear layer over the last real token's final hidden state, as an alternative to
generating the label (the verbalizer approach).

`forward(input_ids)` returns per-position class logits (B, T, num_labels); training puts the class index
at each row's last real token and -100 elsewhere, so the shared loop's cross-entropy trains it unchanged.
With right padding no attention mask is needed: a real token never attends to the padding after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..atomic import atomic_write_text
from ..checkpoint import CheckpointError, load_tensors, save_tensors
from ..loading import load_model, save
from ..model import GPT
from ..tokenizer import Tokenizer

HEAD_WEIGHTS_NAME = "classifier.safetensors"
HEAD_CONFIG_NAME = "classifier.json"


class SequenceClassifier(nn.Module):
    """A GPT body plus `head: Linear(n_embd, num_labels)`."""

    def __init__(self, body: GPT, labels: Sequence[str]) -> None:
        super().__init__()
        self.body = body
        self.labels = [str(label) for label in labels]
        self.config = body.config
        self.head = nn.Linear(body.config.n_embd, len(self.labels))
        nn.init.normal_(self.head.weight, std=body.config.init_std)
        nn.init.zeros_(self.head.bias)
        self._hidden: Optional[torch.Tensor] = None
        # The final norm's output is the hidden state the LM head would read.
        body.norm_f.register_forward_hook(self._keep_hidden)

    @property
    def tokenizer(self):  # noqa: ANN201 - the body's Tokenizer, for saving
        return getattr(self.body, "tokenizer", None)

    def _keep_hidden(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._hidden = output

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Class logits at every position, (B, T, num_labels)."""
        self.body(input_ids, **kwargs)
        hidden, self._hidden = self._hidden, None
        return self.head(hidden)

    @torch.inference_mode()
    def predict(self, token_ids: Sequence[Sequence[int]]) -> list[str]:
        """The predicted label of each tokenized prompt."""
        out = []
        for ids in token_ids:
            logits = self(torch.tensor([list(ids)], dtype=torch.long, device=self.head.weight.device))
            out.append(self.labels[int(logits[0, -1].argmax())])
        return out

    def save_head(self, directory: str | Path) -> None:
        """Write classifier.safetensors + classifier.json (labels) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_tensors({"weight": self.head.weight, "bias": self.head.bias}, directory / HEAD_WEIGHTS_NAME)
        atomic_write_text(directory / HEAD_CONFIG_NAME, json.dumps({"labels": self.labels}, indent=2))

    def save_pretrained(self, directory: str | Path, tokenizer: Optional[Tokenizer] = None) -> Path:
        """The body as a normal model folder (with the tokenizer, when given) plus the head files."""
        save(directory, self.body, tokenizer)
        self.save_head(directory)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SequenceClassifier":
        """Load a folder written by `save_pretrained`."""
        directory = Path(directory)
        config_file = directory / HEAD_CONFIG_NAME
        if not config_file.is_file():
            raise CheckpointError(f"{directory}: no {HEAD_CONFIG_NAME} (not a classifier folder)")
        labels = json.loads(config_file.read_text(encoding="utf-8")).get("labels")
        if not isinstance(labels, list) or not labels:
            raise CheckpointError(f"{config_file}: field 'labels' must be a non-empty list")
        model = cls(load_model(directory), labels)
        model.load_head(directory)
        return model.eval()

    def load_head(self, directory: str | Path) -> None:
        """Read the head weights from `directory`."""
        state = load_tensors(Path(directory) / HEAD_WEIGHTS_NAME)
        if state["weight"].shape != self.head.weight.shape:
            raise CheckpointError(f"{directory}: head shape {tuple(state['weight'].shape)} does not match "
                                  f"{tuple(self.head.weight.shape)} (labels {self.labels})")
        with torch.no_grad():
            self.head.weight.copy_(state["weight"])
            self.head.bias.copy_(state["bias"])


__all__ = ["SequenceClassifier", "HEAD_WEIGHTS_NAME", "HEAD_CONFIG_NAME"]
