"""Simple text augmentation for fine-tuning inputs (EDA, Wei & Zou 2019): random word deletion, random
adjacent swaps and a user-given synonym table. Applied to prompts only, fresh at every draw."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import ConfigError


@dataclass
class AugmentConfig:
    """Probabilities per word; `synonyms` maps a word to its replacements (case-sensitive)."""

    deletion: float = 0.0
    swap: float = 0.0
    synonym: float = 0.0
    synonyms: dict[str, list[str]] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ConfigError naming the field when a probability or the table is invalid."""
        for name in ("deletion", "swap", "synonym"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"augment field {name!r} must be a probability in [0, 1), got {value!r}")
        if not isinstance(self.synonyms, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and v and all(isinstance(s, str) for s in v)
                for k, v in self.synonyms.items()):
            raise ConfigError("augment field 'synonyms' must map words to non-empty lists of strings")
        if self.synonym > 0 and not self.synonyms:
            raise ConfigError("augment field 'synonym' is set but 'synonyms' (the table) is empty")

    @property
    def active(self) -> bool:
        return self.deletion > 0 or self.swap > 0 or self.synonym > 0


def augment_text(text: str, config: AugmentConfig, rng: random.Random) -> str:
    """A perturbed copy of `text`: each word may be deleted, replaced by a synonym, or swapped with its neighbour."""
    if not config.active:
        return text
    # Split on single spaces so newlines and indentation inside words survive.
    words = text.split(" ")
    kept = [w for w in words if not (config.deletion and w.strip() and rng.random() < config.deletion)]
    if not any(w.strip() for w in kept):
        kept = words  # never delete everything
    out = []
    for w in kept:
        core = w.strip(".,;:!?\"'()")
        if config.synonym and core in config.synonyms and rng.random() < config.synonym:
            w = w.replace(core, rng.choice(config.synonyms[core]), 1)
        out.append(w)
    for i in range(len(out) - 1):
        if config.swap and rng.random() < config.swap:
            out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


__all__ = ["AugmentConfig", "augment_text"]
