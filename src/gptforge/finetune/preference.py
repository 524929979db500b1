"""Preference tuning on the one training loop: DPO (with a frozen reference model) and ORPO (reference-free).

Both read pairs of answers to one prompt (`gptforge.data.preference`) and score each answer by its
summed log-probability under the model, answer tokens only. With `s = log p(answer | prompt)`:

- DPO (Rafailov et al. 2023): `z = beta * ((s_chosen - s_rejected) - (ref_chosen - ref_rejected))`, where
  `ref` is the frozen starting model (LoRA: the base model with the adapters switched off, so no copy).
  `loss: sigmoid` is `-log sigmoid(z)`; with `label_smoothing = e` it is conservative DPO,
  `-(1 - e) log sigmoid(z) - e log sigmoid(-z)` (labels flipped with probability e).
  `loss: ipo` is IPO (Azar et al. 2023) on per-token averages, as TRL computes it:
  `(d / n - 1 / (2 beta))^2` with `d / n` the length-normalized log-ratio difference.
  Implicit rewards: `beta * (s - ref)`; reward accuracy: the share of pairs whose chosen reward is higher.
- ORPO (Hong et al. 2024): no reference. With per-token average log-probs `a`, the odds ratio term is
  `log sigmoid(log odds(a_chosen) - log odds(a_rejected))`, `log odds(a) = a - log(1 - exp(a))`; the loss
  is the chosen answer's token NLL minus `beta` times that term. Rewards: `beta * a`.

The loss of a step is the mean over its pairs (the loop's unit is a pair), so gradient accumulation and
DDP ranks see one global mean, as for token losses.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from ..data.preference import Pair, collate_pairs, encode_pair
from ..data.records import Record
from ..data.sft import IGNORE_INDEX
from .lora import adapters_disabled, lora_modules

if TYPE_CHECKING:  # pragma: no cover
    from ..tokenizer import Tokenizer

OBJECTIVES = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class PreferenceSettings:
    """The `preference:` section of a recipe (used when `objective` is dpo or orpo)."""

    beta: float = 0.1  # DPO: scale of the implicit reward; ORPO: weight of the odds-ratio term (lambda)
    loss: str = "sigmoid"  # DPO: sigmoid | ipo
    label_smoothing: float = 0.0  # DPO sigmoid: probability that a pair's labels are flipped (cDPO)

    def validate(self, objective: str) -> None:
        """Raise ConfigError naming the field when a value is out of range."""
        if not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ConfigError(f"preference.beta must be a positive number, got {self.beta!r}")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"preference.loss must be one of {list(DPO_LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and (objective != "dpo" or self.loss != "sigmoid"):
            raise ConfigError("preference.label_smoothing applies to objective: dpo with loss: sigmoid only")
        if self.loss != "sigmoid" and objective != "dpo":
            raise ConfigError(f"preference.loss: {self.loss} applies to objective: dpo only")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, number of target tokens) per row; labels are shifted, -100 = not scored."""
    rows, width, vocab = logits.shape
    token = -F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(rows, width)
    return token.sum(-1), (labels != IGNORE_INDEX).sum(-1)


class ReferenceModel:
    """The frozen model DPO measures against: a copy of the starting weights, or (LoRA) adapters switched off."""

    def __init__(self, model: nn.Module) -> None:
        self.lora = bool(lora_modules(model))
        if self.lora:
            self.model = model  # the same weights; its adapters are disabled while it scores
        else:
            self.model = copy.deepcopy(model).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logps(self, input_ids: torch.Tensor, labels: torch.Tensor,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Summed answer log-probabilities of each row under the reference."""
        model = self.model
        if next(model.parameters()).device != input_ids.device:
            model.to(input_ids.device)
        with contextlib.ExitStack() as stack:
            if self.lora:
                stack.enter_context(adapters_disabled(model))
                was_training = model.training
                model.eval()  # no adapter or base dropout: the reference is deterministic
                stack.callback(model.train, was_training)
            with autocast():
                logits = model(input_ids)
            return sequence_logps(logits, labels)[0]


class PreferenceObjective:
    """The loop's objective for pair batches (`collate_pairs`): DPO or ORPO; the unit is a pair."""

    def __init__(self, objective: str, settings: PreferenceSettings, reference: Optional[ReferenceModel] = None) -> None:
        if objective not in ("dpo", "orpo"):
            raise ConfigError(f"objective must be 'dpo' or 'orpo' for preference tuning, got {objective!r}")
        if objective == "dpo" and reference is None:
            raise ValueError("DPO needs a reference model")
        self.objective, self.settings, self.reference = objective, settings, reference

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Pairs in the batch."""
        return batch["input_ids"].shape[0] // 2

    def shape(self, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(input tokens of both sides, sequence length)."""
        ids = batch["input_ids"]
        return ids.numel(), ids.shape[1]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
             autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed per-pair loss and summed per-pair metrics (chosen and rejected in one forward)."""
        ids, labels = batch["input_ids"], batch["labels"]
        ref = self.reference.logps(ids, labels, autocast) if self.reference is not None else None
        with autocast():
            logits = model(ids)
        logps, lengths = sequence_logps(logits, labels)
        losses, metrics = self.pair_losses(logps, lengths, ref)
        return losses.sum(), {k: v.sum() for k, v in metrics.items()}

    def pair_losses(self, logps: torch.Tensor, lengths: torch.Tensor,
                    ref: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) and metrics from the (2B,) summed log-probs: chosen rows, then rejected rows."""
        beta = float(self.settings.beta)
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = lengths.clamp(min=1).to(logps.dtype).chunk(2)
        metrics: dict[str, torch.Tensor] = {"logps_chosen": chosen.detach(), "logps_rejected": rejected.detach()}
        if self.objective == "dpo":
            ref_chosen, ref_rejected = ref.chunk(2)
            chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
            if self.settings.loss == "ipo":
                delta = chosen_ratio / n_chosen - rejected_ratio / n_rejected
                losses = (delta - 1.0 / (2.0 * beta)) ** 2
            else:
                z = beta * (chosen_ratio - rejected_ratio)
                eps = float(self.settings.label_smoothing)
                losses = -F.logsigmoid(z) * (1.0 - eps) - F.logsigmoid(-z) * eps
            chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        else:  # ORPO
            mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
            # log odds(p) = log p - log(1 - p), with log p the per-token average (always < 0)
            log_odds = (mean_chosen - mean_rejected) - (torch.log1p(-torch.exp(mean_chosen).clamp(max=1 - 1e-7))
                                                        - torch.log1p(-torch.exp(mean_rejected).clamp(max=1 - 1e-7)))
            ratio = F.logsigmoid(log_odds)
            losses = -mean_chosen - beta * ratio
            metrics["nll"] = -mean_chosen.detach()
            metrics["log_odds_ratio"] = ratio.detach()
            chosen_reward, rejected_reward = beta * mean_chosen.detach(), beta * mean_rejected.detach()
        metrics.update(rewards_chosen=chosen_reward, rewards_rejected=rejected_reward,
                       reward_margin=chosen_reward - rejected_reward,
                       reward_accuracy=(chosen_reward > rejected_reward).to(logps.dtype))
        return losses, metrics


class PairSource:
    """`next_batch()` of preference pairs, shuffled per epoch from (seed, epoch); resumes exactly."""

    def __init__(self, records: Sequence[Record], tokenizer: "Tokenizer", *, batch_size: int, max_len: int,
                 seed: int = 0) -> None:
        self.records, self.tokenizer = list(records), tokenizer
        self.batch_size, self.max_len, self.seed = batch_size, max_len, seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cursor = 0
        self._cache: dict[int, Pair] = {}

    def pair(self, index: int) -> Pair:
        """The tokenized pair of record `index` (tokenized once)."""
        if index not in self._cache:
            self._cache[index] = encode_pair(self.records[index], self.tokenizer, self.max_len)
        return self._cache[index]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """`batch_size` pairs (chosen rows, then rejected rows)."""
        n = len(self.records)
        pairs = []
        for _ in range(self.batch_size):
            epoch, position = divmod(self.cursor, n)
            order = np.random.default_rng([self.seed, 7919, epoch]).permutation(n)
            pairs.append(self.pair(int(order[position])))
            self.cursor += 1
        return collate_pairs(pairs, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])


class PreferenceEvaluator:
    """`evaluate(model)` on held-out pairs: val_loss (the preference loss), rewards, margins, log-probs, accuracy."""

    def __init__(self, records: Sequence[Record], tokenizer: "Tokenizer", objective: PreferenceObjective, *,
                 max_len: int, batch_size: int = 8) -> None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        pairs = [encode_pair(r, tokenizer, max_len) for r in records]
        self.batches = [collate_pairs(pairs[i:i + batch_size], pad_id) for i in range(0, len(pairs), batch_size)]
        self.objective, self.pairs = objective, len(pairs)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Metrics averaged over the held-out pairs (the loop calls this under no_grad and its autocast)."""
        device = next(model.parameters()).device
        totals: dict[str, float] = {}
        for batch in self.batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, metrics = self.objective.loss(model, batch, contextlib.nullcontext)
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return {f"val_{k}": v / max(self.pairs, 1) for k, v in totals.items()}


def plot_reward_margin(metrics_path: str | Path, png_path: str | Path, title: str = "reward margin") -> Optional[Path]:
    """Draw the train reward margin per step and the held-out margin and accuracy per evaluation into a PNG."""
    from ..train.metrics import read_metrics, save_figure

    records = read_metrics(metrics_path)
    train = [r for r in records if "reward_margin" in r]
    evals = [r for r in records if "val_reward_margin" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["reward_margin"] for r in train], lw=1, alpha=0.6,
                label="train reward margin")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_reward_margin"] for r in evals], "o-", ms=4,
                label="held-out reward margin")
        acc = ax.twinx()
        acc.plot([r["step"] for r in evals], [r.get("val_reward_accuracy", float("nan")) for r in evals], "s--",
                 ms=3, color="tab:green", label="held-out reward accuracy")
        acc.set_ylim(-0.02, 1.02)
        acc.set_ylabel("reward accuracy")
        acc.legend(loc="lower right")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward(chosen) - reward(rejected)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return save_figure(fig, png_path)


__all__ = ["PreferenceSettings", "PreferenceObjective", "ReferenceModel", "PairSource", "PreferenceEvaluator",
           "sequence_logps", "plot_reward_margin", "OBJECTIVES", "DPO_LOSSES"]
