"""Quality on Python the model never saw: bits per byte and next-line exact match, each next to a baseline.

The held-out set is the installed source of packages gptforge itself depends on (`HELDOUT_PACKAGES`),
found at run time through `importlib.metadata`. None of it is in any training corpus: the `stdlib`
source reads only the standard library (site-packages excluded), and a held-out file whose bytes equal
a standard-library file is left out. The sample is deterministic: files are cut into chunks of whole
lines and chunks are taken in the order of a hash of (package, path, chunk index) up to a byte budget
per package, so two runs on one machine score the same text (`HeldoutSet.fingerprint` says so).

Two figures, each computed by the same code for the model and for its baseline:

* **bits per UTF-8 byte** of the held-out text (the total negative log-likelihood in bits over the
  text's size in bytes, so tokenizers compare). Baseline: a unigram model over the model's own tokens,
  fit on a fixed sample of the standard library (add-one smoothed), scored through the same
  sliding-window code as the model.
* **next-line exact match**: the prompt is the file up to the end of the line before a target line
  (trailing whitespace removed, at most the last `context_tokens` tokens); greedy decoding continues
  it, and the prediction is the first non-blank line after the prompt's line ends. It matches when it
  equals the target with trailing whitespace stripped (indentation counts). A continuation that does
  not end the prompt's line first, or runs out of tokens inside the line, is a miss. Targets are lines
  with at least `MIN_LINE_CHARS` characters after stripping, at least one letter and at most
  `MAX_LINE_CHARS` characters. Baseline: repeating the previous non-blank line.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata as metadata
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch

from .perplexity import sliding_windows
from .scoring import context_length, prefix_token_id, score_continuations

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

# Direct dependencies of gptforge written in plain Python (numpy, torch and matplotlib carry generated
# code and data). Changing this list changes the figures: RESULTS.md compares runs of one list.
HELDOUT_PACKAGES = ("jinja2", "tqdm", "pyyaml", "fastapi", "uvicorn", "pydantic", "prometheus_client",
                    "sacrebleu", "rouge_score")
PACKAGE_BYTES = 12_000  # held-out text per package (about 110 kB in all)
CHUNK_BYTES = 4_000  # chunks of whole lines; a chunk is one scored document
MIN_LINE_CHARS = 10  # shorter targets (`else:`, `return`, `)`) are too easy to say much
MAX_LINE_CHARS = 80  # with MAX_NEW_TOKENS, room for the line even at 2 characters per token
MAX_NEW_TOKENS = 48
NEXT_LINES = 200  # target lines scored for exact match
STDLIB_UNIGRAM_BYTES = 2_000_000  # standard-library text the unigram baseline is fit on
_SKIPPED_DIRS = {"tests", "test", "testing", "__pycache__", "_vendor", "vendor"}


@dataclass
class HeldoutChunk:
    """Consecutive whole lines of one file; `before` is the file's text ahead of them (prompt context)."""

    package: str
    path: str  # relative to the package's installation root, e.g. jinja2/lexer.py
    index: int  # chunk number within the file
    text: str
    before: str


@dataclass
class HeldoutSet:
    """The held-out sample: chunks, the package versions they came from, and what was not available."""

    chunks: list[HeldoutChunk]
    versions: dict[str, str]
    missing: list[str] = field(default_factory=list)  # one sentence per package that could not be used
    left_out: dict[str, int] = field(default_factory=dict)  # files left out, per reason

    @property
    def num_bytes(self) -> int:
        return sum(len(c.text.encode("utf-8")) for c in self.chunks)

    @property
    def fingerprint(self) -> str:
        """sha256 of the sampled text: equal fingerprints mean the figures were measured on the same text."""
        h = hashlib.sha256()
        for chunk in self.chunks:
            h.update(f"{chunk.package}/{chunk.path}#{chunk.index}\0".encode())
            h.update(chunk.text.encode("utf-8"))
        return h.hexdigest()


def _chunks_of(text: str, chunk_bytes: int) -> list[tuple[int, int]]:
    """(start, end) character offsets of consecutive whole-line chunks of at most ~chunk_bytes."""
    spans, start, size = [], 0, 0
    position = 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        size += len(line.encode("utf-8"))
        if size >= chunk_bytes:
            spans.append((start, position))
            start, size = position, 0
    if position > start:
        spans.append((start, position))
    return spans


def _is_test_file(filename: str) -> bool:
    return filename.startswith("test_") or filename.endswith("_test.py") or filename == "conftest.py"


def _package_files(name: str) -> tuple[Optional[metadata.Distribution], list[tuple[str, Path]], Optional[str]]:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None, [], f"{name} is not installed: left out of the held-out set"
    files = [(str(f), Path(str(dist.locate_file(f)))) for f in (dist.files or []) if str(f).endswith(".py")]
    if not files:
        return dist, [], f"{name} {dist.version} lists no installed .py files: left out of the held-out set"
    return dist, sorted(files), None


def load_heldout_python(packages: Optional[Sequence[str]] = None, package_bytes: int = PACKAGE_BYTES,
                        chunk_bytes: int = CHUNK_BYTES) -> HeldoutSet:
    """The deterministic held-out sample of installed, non-stdlib Python (default: `HELDOUT_PACKAGES`)."""
    from ..data.corpus import machine_generated_rule, stdlib_files

    packages = HELDOUT_PACKAGES if packages is None else tuple(packages)
    stdlib_digests = {hashlib.sha256(p.read_bytes()).digest() for p in stdlib_files()}
    seen: set[bytes] = set()
    chunks: list[HeldoutChunk] = []
    versions: dict[str, str] = {}
    missing: list[str] = []
    left_out: dict[str, int] = {}

    def leave_out(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    for name in packages:
        dist, files, problem = _package_files(name)
        if problem:
            missing.append(problem)
            continue
        versions[name] = dist.version  # type: ignore[union-attr]
        candidates = []
        for relative, path in files:
            if _SKIPPED_DIRS & set(Path(relative).parts[:-1]) or _is_test_file(Path(relative).name):
                leave_out("tests or vendored code")
                continue
            try:
                data = path.read_bytes()
                text = data.decode("utf-8-sig")
            except (OSError, UnicodeDecodeError):
                leave_out("unreadable or not UTF-8")
                continue
            digest = hashlib.sha256(data).digest()
            if digest in stdlib_digests:
                leave_out("a copy of a standard-library file")
                continue
            if digest in seen or not text.strip():
                leave_out("empty or a duplicate")
                continue
            seen.add(digest)
            if machine_generated_rule(text):
                leave_out("machine-generated data")
                continue
            for index, (start, end) in enumerate(_chunks_of(text, chunk_bytes)):
                key = hashlib.sha256(f"{name}/{relative}#{index}".encode()).digest()
                candidates.append((key, HeldoutChunk(name, relative, index, text[start:end], text[:start])))
        room = package_bytes
        for _, chunk in sorted(candidates, key=lambda c: c[0]):
            size = len(chunk.text.encode("utf-8"))
            if size <= room and chunk.text.strip():
                chunks.append(chunk)
                room -= size
    if not chunks:
        raise FileNotFoundError("no held-out Python found: none of the packages " + ", ".join(packages)
                                + " is installed with readable sources")
    return HeldoutSet(chunks, versions, missing, left_out)


# ---- bits per byte --------------------------------------------------------------------------------

def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """log p(token) of an add-one smoothed unigram model (a model that ignores context), shape (vocab,)."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size].astype(np.float64)
    return np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)


class UnigramLM(torch.nn.Module):
    """A baseline "model" that ignores context: every position gets the same token log-probabilities."""

    def __init__(self, log_probs: np.ndarray | torch.Tensor, block_size: int) -> None:
        super().__init__()
        table = torch.as_tensor(np.asarray(log_probs), dtype=torch.float32)
        self.log_probs = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(vocab_size=table.numel(), block_size=block_size)

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.log_probs.expand(*input_ids.shape, -1)  # (B, T, V)


def stdlib_unigram(tokenizer: "Tokenizer", vocab_size: int, block_size: int,
                   max_bytes: int = STDLIB_UNIGRAM_BYTES) -> UnigramLM:
    """The bits-per-byte baseline: token frequencies of a fixed standard-library sample, add-one smoothed."""
    from ..data.corpus import curate_stdlib

    files, _ = curate_stdlib(max_bytes)
    texts = [p.read_text(encoding="utf-8-sig", errors="replace") for p in files]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in encoded])
    return UnigramLM(unigram_log_probs(ids, vocab_size), block_size)


def bits_per_byte(model: torch.nn.Module, tokenizer: "Tokenizer", texts: Sequence[str], *,
                  max_length: Optional[int] = None, stride: Optional[int] = None,
                  batch_size: int = 16) -> dict[str, float]:
    """Bits per UTF-8 byte of `texts`, each scored on its own after a prefix token, with a sliding window.

    Every token of every text is scored exactly once; by default in consecutive windows of the full
    context (lm-eval's rolling windows), a smaller `stride` gives each token more context at more cost.
    """
    length = context_length(model, max_length)
    stride = stride or length
    prefix = prefix_token_id(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []
    num_bytes = 0
    for text in texts:
        ids = [prefix] + tokenizer.encode(text, add_special_tokens=False)
        num_bytes += len(text.encode("utf-8"))
        pairs.extend((ids[b:s], ids[s:e]) for b, s, e in sliding_windows(len(ids), length, stride))
    scores = score_continuations(model, pairs, batch_size=batch_size, max_length=length)
    nll = -sum(s.logprob for s in scores)
    tokens = sum(s.num_tokens for s in scores)
    return {"bits_per_byte": nll / (math.log(2) * num_bytes) if num_bytes else float("nan"),
            "tokens": tokens, "bytes": num_bytes}


# ---- next-line exact match ------------------------------------------------------------------------

@dataclass
class LineExample:
    """One next-line question: the prompt (text before the target line, trailing whitespace removed)."""

    package: str
    path: str
    prompt: str
    target: str  # the line to reproduce, trailing whitespace stripped

    @property
    def previous_line(self) -> str:
        """The prompt's last non-blank line (what the repeat-the-previous-line baseline predicts)."""
        lines = [line for line in self.prompt.split("\n") if line.strip()]
        return lines[-1].rstrip() if lines else ""


def is_target_line(line: str) -> bool:
    """Whether a line is asked about: not blank, not trivial (see the module docstring), not overlong."""
    stripped = line.strip()
    return (len(stripped) >= MIN_LINE_CHARS and len(line.rstrip()) <= MAX_LINE_CHARS
            and any(ch.isalpha() for ch in stripped))


def next_line_examples(heldout: HeldoutSet, max_lines: int = NEXT_LINES) -> list[LineExample]:
    """Up to `max_lines` target lines of the held-out chunks, picked by a hash of where they are."""
    candidates = []
    for chunk in heldout.chunks:
        offset = 0
        for number, line in enumerate(chunk.text.splitlines(keepends=True)):
            before = chunk.before + chunk.text[:offset]
            offset += len(line)
            if not is_target_line(line) or not before.strip():
                continue
            key = hashlib.sha256(f"{chunk.package}/{chunk.path}#{chunk.index}:{number}".encode()).digest()
            candidates.append((key, chunk, before, line))
    candidates.sort(key=lambda c: c[0])
    return [LineExample(chunk.package, chunk.path, before.rstrip(), line.rstrip())
            for _, chunk, before, line in candidates[:max_lines]]


def predicted_line(continuation: str, finished: bool = False) -> Optional[str]:
    """The line a continuation of a prompt predicts next, or None when it predicts none.

    The continuation must end the prompt's line first (only whitespace before its first newline);
    blank lines are skipped; the first non-blank line counts when it is complete (a newline follows,
    or generation `finished` on its own).
    """
    lines = continuation.split("\n")
    if len(lines) < 2 or lines[0].strip():
        return None
    for i in range(1, len(lines)):
        if lines[i].strip():
            return lines[i].rstrip() if (i < len(lines) - 1 or finished) else None
    return None


def exact_match_rate(examples: Sequence[LineExample], continuations: Sequence[tuple[str, bool]]) -> float:
    """Share of examples whose continuation (text, finished) predicts exactly the target line."""
    if not examples:
        return float("nan")
    hits = sum(predicted_line(text, finished) == ex.target for ex, (text, finished) in zip(examples, continuations))
    return hits / len(examples)


def repeat_previous_line(examples: Sequence[LineExample]) -> list[tuple[str, bool]]:
    """Continuations of the baseline: the previous non-blank line, again."""
    return [("\n" + ex.previous_line + "\n", True) for ex in examples]


def encode_prompt(tokenizer: "Tokenizer", prompt: str, max_tokens: int) -> list[int]:
    """The last `max_tokens` tokens of a file prefix; one that fits whole starts with the document separator."""
    text = prompt[-max_tokens * 16:]  # characters first (cheap): no token is more than a few dozen long
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(text) == len(prompt) and len(ids) < max_tokens:
        return [prefix_token_id(tokenizer)] + ids  # the top of a file follows a separator, as in training
    return ids[-max_tokens:]


def greedy_continuations(model: torch.nn.Module, tokenizer: "Tokenizer", examples: Sequence[LineExample], *,
                         max_new_tokens: int = MAX_NEW_TOKENS, context_tokens: Optional[int] = None,
                         batch_size: int = 32) -> list[tuple[str, bool]]:
    """Greedy continuations (text, finished by EOS) of the examples' prompts, left-truncated to fit the context."""
    from ..generate import generate

    block = model.config.block_size
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than the model context ({block})")
    keep = min(context_tokens or block, block - max_new_tokens)
    prompts = [encode_prompt(tokenizer, ex.prompt, keep) for ex in examples]
    results: list[tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        outputs = generate(model, prompts[start:start + batch_size], tokenizer, max_new_tokens=max_new_tokens,
                           do_sample=False)
        results.extend((out.text, out.finish_reason == "stop") for out in outputs)
    return results


# ---- degenerate completions ----------------------------------------------------------------------

_REPEATED_UNIT = re.compile(r"(\S.{0,29}?)\1{5,}")


def is_degenerate(text: str) -> bool:
    """A completion stuck in a loop: a line of 4+ characters three times, or a short run repeated 6+ times.

    `____________`, `. . . . . . `, `self.self.self.self.self.self.` and the same `return x` line over
    and over are loops; ordinary code rarely is (benchmarks/sampling_settings.py measures how rarely).
    """
    lines = [line.strip() for line in text.split("\n") if len(line.strip()) >= 4]
    if lines and max(collections.Counter(lines).values()) >= 3:
        return True
    return _REPEATED_UNIT.search(text) is not None


# ---- both, as one report --------------------------------------------------------------------------

@dataclass
class HeldoutReport:
    """Held-out Python figures of one model, each with its baseline."""

    bits_per_byte: float
    unigram_bits_per_byte: float  # baseline
    next_line_exact_match: float
    repeat_line_exact_match: float  # baseline
    lines: int
    tokens: int
    bytes: int
    chunks: int
    context: int
    versions: dict[str, str]
    fingerprint: str
    missing: list[str]
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few (target, predicted) pairs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Two lines for people."""
        return (f"held-out Python ({len(self.versions)} packages, {self.bytes / 1000:.0f} kB): "
                f"{self.bits_per_byte:.3f} bits per byte (unigram baseline {self.unigram_bits_per_byte:.3f})\n"
                f"next-line exact match on {self.lines} lines: {self.next_line_exact_match:.1%} "
                f"(repeating the previous line: {self.repeat_line_exact_match:.1%})")


@torch.no_grad()
def evaluate_heldout_python(model: torch.nn.Module, tokenizer: "Tokenizer", *, heldout: Optional[HeldoutSet] = None,
                            max_lines: int = NEXT_LINES, max_length: Optional[int] = None, batch_size: int = 16,
                            baseline: Optional[UnigramLM] = None,
                            progress: Optional[Callable[[str], None]] = None) -> HeldoutReport:
    """Bits per byte and next-line exact match of `model` on held-out Python, with their baselines.

    `heldout` defaults to `load_heldout_python()`, `baseline` to `stdlib_unigram` for the model's tokenizer.
    """
    heldout = heldout or load_heldout_python()
    length = context_length(model, max_length)
    texts = [c.text for c in heldout.chunks]
    if progress:
        progress(f"scoring {heldout.num_bytes / 1000:.0f} kB of held-out Python")
    was_training = model.training
    model.eval()
    try:
        scored = bits_per_byte(model, tokenizer, texts, max_length=length, batch_size=batch_size)
        unigram = baseline or stdlib_unigram(tokenizer, model.config.vocab_size, length)
        reference = bits_per_byte(unigram, tokenizer, texts, max_length=length, batch_size=batch_size)
        examples = next_line_examples(heldout, max_lines)
        if progress:
            progress(f"completing {len(examples)} held-out lines greedily")
        continuations = greedy_continuations(model, tokenizer, examples, context_tokens=length,
                                             max_new_tokens=min(MAX_NEW_TOKENS, length // 2), batch_size=2 * batch_size)
    finally:
        model.train(was_training)
    shown = [{"target": ex.target, "predicted": predicted_line(text, done)}
             for ex, (text, done) in list(zip(examples, continuations))[:5]]
    return HeldoutReport(
        bits_per_byte=scored["bits_per_byte"], unigram_bits_per_byte=reference["bits_per_byte"],
        next_line_exact_match=exact_match_rate(examples, continuations),
        repeat_line_exact_match=exact_match_rate(examples, repeat_previous_line(examples)),
        lines=len(examples), tokens=int(scored["tokens"]), bytes=int(scored["bytes"]), chunks=len(texts),
        context=length, versions=dict(heldout.versions), fingerprint=heldout.fingerprint,
        missing=list(heldout.missing), examples=shown)


__all__ = ["HELDOUT_PACKAGES", "HeldoutChunk", "HeldoutSet", "HeldoutReport", "LineExample", "UnigramLM",
           "bits_per_byte", "encode_prompt", "evaluate_heldout_python", "exact_match_rate", "greedy_continuations",
           "is_degenerate", "is_target_line", "load_heldout_python", "next_line_examples", "predicted_line",
           "repeat_previous_line", "stdlib_unigram", "unigram_log_probs"]
