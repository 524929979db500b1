"""Pretraining recipes: YAML (model / data / train sections) + dotted overrides -> a trained run folder.

    recipe = load_recipe("configs/shakespeare-char.yaml", ["--train.max_steps=100"])
    run_dir = pretrain(recipe)              # or pretrain("configs/x.yaml", overrides=[...], resume=True)
    model, tokenizer = gptforge.load(run_dir / "model")

Sections:
    model:  `preset` (a Config preset name), `init_from` (a model folder to continue from), and any
            `Config` field; vocab_size defaults to the tokenizer's (also over a preset's), block_size to
            the preset's or data.seq_len.
    data:   `DataConfig` below (sources are prepared into token shards once, then reused).
    train:  `gptforge.train.loop.TrainConfig`.
    out_dir: the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from ..config import (Config, ConfigError, ConfigSource, apply_overrides, check_value, dataclass_from_dict, load_yaml,
                      unknown_field_message)

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where pretraining text comes from and how it is cut into windows (the `data:` section)."""

    sources: list[str] = field(default_factory=list)  # files, folders, globs, .jsonl/.parquet, stdlib, hf:NAME
    dir: Optional[str] = None  # prepared corpus folder (default: <out_dir>/data); used as-is when sources is empty
    tokenizer: str = "bpe"  # bpe | char | path to a tokenizer.json or folder
    vocab_size: int = 8192  # for bpe
    val_fraction: float = 0.1
    split: Literal["tail", "documents"] = "tail"  # validation: the stream's last val_fraction, or whole documents
    text_field: str = "text"
    on_decode_error: Literal["fail", "skip"] = "fail"  # files that are not UTF-8: stop, or skip and list them
    max_bytes: Optional[int] = None  # read at most this much text (quick demos)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"  # token dtype on disk
    fim_rate: float = 0.0  # share of training documents in fill-in-the-middle form (adds FIM tokens; split: documents)
    fim_spm_rate: float = 0.5  # of those, the share in SPM order (the rest PSM)
    fim_seed: int = 0  # the FIM draws: same seed, same shards
    fim_piece_chars: int = 0  # >0: FIM per piece of at most this many characters (cut at line ends), not per file
    fim_line_rate: float = 0.0  # share of FIM examples whose middle is whole lines (the rest: character cuts)
    seq_len: int = 256  # tokens per training window
    batch_size: int = 16  # windows per micro-batch and rank
    eval_tokens: int = 200_000  # validation tokens per evaluation (fixed windows, evenly spread)
    eval_batch_size: int = 0  # 0: batch_size


@dataclass
class Recipe:
    """A complete pretraining recipe."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: Any = None  # TrainConfig (imported lazily: it pulls in torch)
    out_dir: str = "runs/pretrain"

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "out_dir": self.out_dir}


RECIPE_SECTIONS = ("model", "data", "train", "out_dir")
MODEL_EXTRAS = ("preset", "init_from")  # model-section keys that are not Config fields


def recipe_from_dict(data: dict[str, Any], source: str | ConfigSource = "recipe") -> Recipe:
    """Build a Recipe from a mapping; wrong types, unknown sections or fields raise ConfigError naming them."""
    from .loop import TrainConfig

    source = ConfigSource.of_file(source)
    for name in data:
        if name not in RECIPE_SECTIONS:
            raise ConfigError(unknown_field_message(source, "", name, RECIPE_SECTIONS))
    for name in ("model", "data", "train"):
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise ConfigError(f"{source.of(name)}: section {name} must be a mapping of field: value, "
                              f"got {data[name]!r}")
    model = dict(data.get("model") or {})
    data_section = dict(data.get("data") or {})
    if isinstance(data_section.get("sources"), str):  # `sources: notes.txt` means one source
        data_section["sources"] = [data_section["sources"]]
    data_cfg = dataclass_from_dict(DataConfig, data_section, source, "data.")
    train_cfg = dataclass_from_dict(TrainConfig, dict(data.get("train") or {}), source, "train.")
    try:
        train_cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"{source.file}: {exc}") from exc
    out_dir = check_value(data.get("out_dir", "runs/pretrain"), str, source, "out_dir")
    recipe = Recipe(model=model, data=data_cfg, train=train_cfg, out_dir=out_dir)
    model_config(recipe, vocab_size=model.get("vocab_size", 256), source=source)  # validate field names early
    return recipe


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Load a YAML recipe (or start from defaults when `path` is None) and apply `section.key=value` overrides."""
    data = load_yaml(path) if path is not None else {}
    source = ConfigSource(str(path or "recipe"))
    apply_overrides(data, list(overrides), source)
    return recipe_from_dict(data, source=source)


def model_config(recipe: Recipe, vocab_size: int, source: str | ConfigSource = "recipe") -> Config:
    """The model Config of a recipe: preset, then explicit fields; vocab and context filled from the data."""
    source = ConfigSource.of_file(source)
    fields = dict(recipe.model)
    fields.pop("init_from", None)
    preset = fields.pop("preset", None)
    base: dict[str, Any] = {}
    if preset is not None:
        from ..config import PRESETS

        if preset not in PRESETS:
            raise ConfigError(f"{source.of('model.preset')}: model.preset {preset!r} is not a preset; "
                              f"available: {', '.join(sorted(PRESETS))}")
        base = {**PRESETS[preset], "name": preset}
    for name in fields:  # suggestions cover `preset` and `init_from` too
        if name not in Config.__dataclass_fields__:
            raise ConfigError(unknown_field_message(source, "model.", name,
                                                    [*Config.__dataclass_fields__, *MODEL_EXTRAS]))
    # The corpus tokenizer decides the vocabulary unless the recipe names one (e.g. padded to a multiple of 64).
    merged = {**base, "vocab_size": vocab_size, **fields}
    merged.setdefault("block_size", recipe.data.seq_len)
    config = Config.from_dict(merged, source=source, prefix="model.")
    if config.block_size < recipe.data.seq_len:
        raise ConfigError(f"{source.file}: data.seq_len ({recipe.data.seq_len}) exceeds model.block_size "
                          f"({config.block_size})")
    if config.vocab_size < vocab_size:
        raise ConfigError(f"{source.file}: model.vocab_size ({config.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({vocab_size})")
    return config


def prepare_data(recipe: Recipe, progress: bool = True) -> Any:
    """Prepare (or reuse) the recipe's token shards; returns the PreparedCorpus."""
    from ..data.shards import load_prepared, prepare_corpus

    d = recipe.data
    folder = Path(d.dir) if d.dir else Path(recipe.out_dir) / "data"
    if not d.sources:
        if d.dir is None:
            raise ConfigError("recipe: set data.sources (files, folders, globs, stdlib, hf:NAME) or data.dir "
                              "(a folder written by `gptforge prepare`)")
        return load_prepared(folder)
    return prepare_corpus(d.sources, folder, tokenizer=d.tokenizer, vocab_size=d.vocab_size,
                          val_fraction=d.val_fraction, split=d.split, text_field=d.text_field,
                          on_decode_error=d.on_decode_error, dtype=d.dtype, max_bytes=d.max_bytes,
                          progress=progress, fim_rate=d.fim_rate, fim_spm_rate=d.fim_spm_rate, fim_seed=d.fim_seed,
                          fim_piece_chars=d.fim_piece_chars, fim_line_rate=d.fim_line_rate)


class ValidationLoss:
    """`evaluate` of a pretraining run: loss on fixed validation windows (`data.eval_tokens` of them).

    Under a time budget the first call also sizes the evaluation: it times the model on one batch and
    keeps at most the tokens (never less than a batch) that let ~6 evaluations fit `train.eval_share` of
    the budget, so that on a slow machine or a short budget evaluation stays a small share (the loop
    spaces evaluations by their measured cost). Every evaluation reads the same windows.
    """

    def __init__(self, corpus: Any, data: DataConfig, train_cfg: Any, info: Any) -> None:
        self.corpus, self.data, self.train_cfg, self.info = corpus, data, train_cfg, info
        self.batch_size = data.eval_batch_size or data.batch_size
        self.max_tokens: Optional[int] = data.eval_tokens or None
        self.sized = not train_cfg.time_budgeted

    def __call__(self, model: Any) -> dict[str, float]:
        from ..data.loader import evaluate_split

        if not self.sized:
            self.max_tokens = self._fit_to_budget(model)
            self.sized = True
        return evaluate_split(model, self.corpus, "val", self.data.seq_len, self.batch_size, self.max_tokens)

    def _fit_to_budget(self, model: Any) -> Optional[int]:
        import time

        from ..data.loader import eval_windows
        from . import distributed as D
        from .budget import eval_token_cap

        device = next(model.parameters()).device
        batches = eval_windows(self.corpus, "val", self.data.seq_len, self.batch_size, self.max_tokens)
        x = next(batches)[0].to(device)
        model(x[:1])  # warm-up on one window: allocator and kernel choice
        started = time.perf_counter()
        model(x)  # one full batch: a single window overstates the cost per token several times
        per_token = (time.perf_counter() - started) / x.numel()
        cfg = self.train_cfg
        cap = max(eval_token_cap(per_token, cfg.max_time, cfg.eval_share), self.data.seq_len * self.batch_size)
        cap = D.broadcast_object(cap, self.info)  # every rank evaluates the same windows
        available = self.corpus.num_tokens("val")
        if cap < min(self.max_tokens or available, available):
            if self.info.is_main:
                log.info("time budget: validation on %s tokens per evaluation (data.eval_tokens %s would take "
                         "%.1f s each)", f"{cap:,}", f"{self.max_tokens or available:,}",
                         per_token * (self.max_tokens or available))
            return cap
        return self.max_tokens


def pretrain(recipe: Recipe | str | Path | dict[str, Any], *, overrides: Sequence[str] = (),
             resume: bool = False) -> Path:
    """Run a pretraining recipe end to end and return the run folder.

    `recipe`: a Recipe, a YAML path, or a mapping with model/data/train/out_dir sections; `overrides`
    are `section.key=value` strings applied on top. The run folder holds config.yaml, metrics.jsonl,
    loss_curve.png, checkpoints/, model/ (final, with tokenizer; `gptforge.load` loads it),
    best/ (best validation loss) and result.json (steps, losses, best metric, `interrupted`).
    `resume=True` continues exactly from the last checkpoint. Works under `torchrun` (DDP, or FSDP2 with train.parallel=fsdp).
    """
    import torch

    from ..atomic import atomic_write_text
    from ..data.loader import TokenWindowLoader
    from ..loading import load_model, save
    from ..model import GPT
    from . import distributed as D
    from .loop import train

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    elif isinstance(recipe, dict) or overrides:
        source = ConfigSource("recipe")
        raw = json.loads(json.dumps(recipe)) if isinstance(recipe, dict) else recipe.to_dict()
        recipe = recipe_from_dict(apply_overrides(raw, list(overrides), source), source)
    cfg = recipe.train
    run_dir = Path(recipe.out_dir)
    if not resume and (run_dir / "checkpoints" / "latest").exists():
        # Checked before anything is written, so the old run's config.yaml and metrics stay intact.
        raise ValueError(f"run folder {run_dir} already has checkpoints; pass --resume to continue it, "
                         "or choose another out_dir")
    info = D.init_distributed(cfg.device)
    try:
        # Rank 0 tokenizes; the others wait and then open the same folder.
        corpus = prepare_data(recipe, progress=cfg.progress) if info.is_main else None
        D.barrier(info)
        if corpus is None:
            from ..data.shards import load_prepared

            corpus = load_prepared(Path(recipe.data.dir) if recipe.data.dir else run_dir / "data")
        tokenizer = corpus.tokenizer
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
        init_from = recipe.model.get("init_from")
        if init_from:
            model = load_model(init_from)
            if model.config.vocab_size < tokenizer.vocab_size:
                raise ConfigError(f"model.init_from {init_from}: vocab_size {model.config.vocab_size} is smaller "
                                  f"than the corpus tokenizer's ({tokenizer.vocab_size})")
        else:
            model = GPT(model_config(recipe, tokenizer.vocab_size))
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = recipe.to_dict()
            resolved["model"] = {**model.config.to_dict(), **({"init_from": init_from} if init_from else {})}
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
            log.info("Pretraining a %s-parameter model on %s training tokens (%s for validation) in %s.",
                     f"{model.num_params():,}", f"{corpus.num_tokens('train'):,}", f"{corpus.num_tokens('val'):,}",
                     run_dir)
        d = recipe.data
        loader = TokenWindowLoader(corpus, "train", d.batch_size, d.seq_len, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size)
        evaluate = ValidationLoss(corpus, d, cfg, info) if corpus.num_tokens("val") > d.seq_len else None
        if evaluate is None and info.is_main:
            log.warning("no validation split (data.val_fraction=%s): no val_loss, early stopping or best/",
                        d.val_fraction)
        result = train(model, cfg, loader, run_dir, evaluate=evaluate, resume=resume, run_config=recipe.to_dict(),
                       save_model=lambda m, directory: save(directory, m, tokenizer))
        if info.is_main:
            summary = {"steps": result.steps, "tokens": result.tokens, "last_loss": result.last_loss,
                       "metrics": result.metrics, "best_metric": result.best_metric, "best_step": result.best_step,
                       "stopped_early": result.stopped_early, "interrupted": result.interrupted,
                       "out_of_time": result.out_of_time, "elapsed_s": round(result.elapsed_s, 1),
                       "parameters": model.num_params()}
            atomic_write_text(run_dir / "result.json", json.dumps(summary, indent=2))
        if result.interrupted and info.is_main:
            log.warning("training interrupted at step %d; checkpoint written to %s (continue with --resume)",
                        result.steps, run_dir / "checkpoints")
        return run_dir
    finally:
        D.shutdown(info)


__all__ = ["DataConfig", "Recipe", "load_recipe", "recipe_from_dict", "model_config", "prepare_data", "pretrain"]
