"""Feedback -> training data: a preference dataset (prompt, chosen, rejected) and an SFT dataset
(prompt, good answer), in the record shapes `gptforge finetune` reads (and TRL's).

Where the pairs come from:
- a comparison ("A is better than B"): chosen A, rejected B;
- an edited answer that differs from the original: chosen the edit, rejected the original;
- ratings: for one prompt, every thumbs-up answer against every thumbs-down answer.
The SFT set holds thumbs-up answers and edited answers. When one person rated the same answer twice,
the later rating counts. Identical records are written once.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_write_text
from .store import Feedback


@dataclass
class ExportSummary:
    """Counts of what the feedback held and what was written."""

    feedback: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    comparisons: int = 0
    edits: int = 0
    superseded_ratings: int = 0
    pairs: Counter = field(default_factory=Counter)  # by source: comparison, edit, ratings
    sft: int = 0
    models: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able counts."""
        return {"feedback": self.feedback, "thumbs_up": self.thumbs_up, "thumbs_down": self.thumbs_down,
                "comparisons": self.comparisons, "edits": self.edits, "superseded_ratings": self.superseded_ratings,
                "pairs": dict(self.pairs), "pairs_total": sum(self.pairs.values()), "sft": self.sft,
                "models": dict(self.models)}

    def sentences(self, prefs_path: Path, sft_path: Path) -> list[str]:
        """The summary for people."""
        models = ", ".join(f"{m} ({n})" for m, n in self.models.most_common()) or "none"
        lines = [f"Read {self.feedback} feedback record(s) about {len(self.models)} model(s): {models}.",
                 f"Ratings: {self.thumbs_up} thumbs up and {self.thumbs_down} thumbs down"
                 + (f" ({self.superseded_ratings} earlier rating(s) replaced by a later one of the same answer)"
                    if self.superseded_ratings else "")
                 + f"; {self.comparisons} side-by-side choice(s); {self.edits} edited answer(s)."]
        sources = ", ".join(f"{n} from {s}" for s, n in sorted(self.pairs.items())) or "none"
        lines.append(f"Wrote {sum(self.pairs.values())} preference pair(s) ({sources}) to {prefs_path}.")
        lines.append(f"Wrote {self.sft} supervised example(s) (thumbs-up and edited answers) to {sft_path}.")
        if not self.pairs:
            lines.append("No preference pairs yet: rate a good and a bad answer to the same prompt, pick the better "
                         "of two answers, or edit an answer.")
        return lines


def _pair(prompt: Any, chosen: str, rejected: str, source: str) -> dict[str, Any]:
    if isinstance(prompt, list):  # chat: TRL's conversational shape
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], "source": source}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}


def _sft(prompt: Any, answer: str) -> dict[str, Any]:
    if isinstance(prompt, list):
        return {"messages": prompt + [{"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def _latest_ratings(rows: Iterable[Feedback], summary: ExportSummary) -> list[Feedback]:
    """Ratings with only the latest kept per (response, answer, key)."""
    latest: dict[tuple, Feedback] = {}
    for row in rows:
        if row.rating is None:
            continue
        key = (row.response_id, row.choice_index, row.key_id) if row.response_id else (row.id,)
        if key in latest:
            summary.superseded_ratings += 1
        latest[key] = row
    return list(latest.values())


def build_datasets(rows: list[Feedback]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], ExportSummary]:
    """(preference records, SFT records, summary) from stored feedback."""
    summary = ExportSummary(feedback=len(rows))
    pairs: list[dict[str, Any]] = []
    sft: list[dict[str, Any]] = []
    by_prompt: dict[str, dict[str, Any]] = defaultdict(lambda: {"prompt": None, "up": [], "down": []})
    for row in rows:
        summary.models[row.model] += 1
        if row.chosen is not None and row.rejected is not None:
            summary.comparisons += 1
            if row.chosen != row.rejected:
                pairs.append(_pair(row.prompt, row.chosen, row.rejected, "comparison"))
        if row.edited is not None:
            summary.edits += 1
            sft.append(_sft(row.prompt, row.edited))
            original = row.answer
            if original is not None and original.strip() != row.edited.strip():
                pairs.append(_pair(row.prompt, row.edited, original, "edit"))
    for row in _latest_ratings(rows, summary):
        answer = row.answer
        if answer is None:
            continue
        group = by_prompt[json.dumps(row.prompt, sort_keys=True, ensure_ascii=False)]
        group["prompt"] = row.prompt
        if row.rating > 0:
            summary.thumbs_up += 1
            group["up"].append(answer)
            sft.append(_sft(row.prompt, answer))
        else:
            summary.thumbs_down += 1
            group["down"].append(answer)
    for group in by_prompt.values():
        for good in dict.fromkeys(group["up"]):
            for bad in dict.fromkeys(group["down"]):
                if good != bad:
                    pairs.append(_pair(group["prompt"], good, bad, "ratings"))
    pairs, sft = _unique(pairs), _unique(sft)
    summary.pairs = Counter(p["source"] for p in pairs)
    summary.sft = len(sft)
    return pairs, sft, summary


def _unique(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        key = json.dumps({k: v for k, v in record.items() if k != "source"}, sort_keys=True, ensure_ascii=False)
        seen.setdefault(key, record)
    return list(seen.values())


def export_feedback(rows: list[Feedback], prefs_path: str | Path, sft_path: str | Path) -> ExportSummary:
    """Write the preference and SFT datasets as JSONL (atomically); returns the summary."""
    pairs, sft, summary = build_datasets(rows)
    for path, records in ((Path(prefs_path), pairs), (Path(sft_path), sft)):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return summary


def default_sft_path(prefs_path: str | Path) -> Path:
    """prefs.jsonl -> prefs.sft.jsonl beside it."""
    prefs_path = Path(prefs_path)
    return prefs_path.with_name(prefs_path.stem + ".sft" + (prefs_path.suffix or ".jsonl"))


__all__ = ["build_datasets", "export_feedback", "ExportSummary", "default_sft_path"]

