"""Generate docs/configuration.md from the config dataclasses (fields, types, defaults, source comments).

    python tools/config_reference.py           # rewrite docs/configuration.md
    python tools/config_reference.py --check   # exit 1 when docs/configuration.md is out of date

Descriptions come from the comments next to each field in the source (trailing `# ...` or full-line
comments directly above it), so the reference stays true to the code when fields change.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, Literal, get_args

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "configuration.md"

# (heading, "module:Class", where the fields are set). Order is the order of the page.
SECTIONS: list[tuple[str, str, str]] = [
    ("Model architecture", "gptforge.config:Config",
     "the `model:` section of a pretraining recipe (plus `preset: NAME` and `init_from: DIR`), "
     "`Config.from_name(preset, **fields)`, or `config.json` under the `\"gptforge\"` key of a saved model."),
    ("Pretraining data", "gptforge.train.pretrain:DataConfig",
     "the `data:` section of a pretraining recipe (`gptforge pretrain --config X.yaml --data.seq_len=512`)."),
    ("Training loop", "gptforge.train.loop:TrainConfig",
     "the `train:` section of a pretraining or fine-tuning recipe (`--train.lr=0.001`)."),
    ("Fine-tuning recipe", "gptforge.finetune.recipe:FinetuneRecipe",
     "the top level of a fine-tuning recipe (`gptforge finetune --config X.yaml`); `train:` is the "
     "training loop above."),
    ("Fine-tuning task", "gptforge.finetune.recipe:TaskRecipe",
     "each entry of the `tasks:` list of a fine-tuning recipe (or `--data FILE` for one task)."),
    ("Fine-tuning data", "gptforge.finetune.recipe:DataSettings",
     "the `data:` section of a fine-tuning recipe."),
    ("LoRA adapters", "gptforge.finetune.lora:LoRAConfig",
     "the `lora:` section of a fine-tuning recipe (with `method: lora`)."),
    ("Text augmentation", "gptforge.data.augment:AugmentConfig",
     "the `augment:` section of a fine-tuning recipe."),
    ("Sampling parameters", "gptforge.sampling:SamplingParams",
     "keywords of `gptforge.generate.generate(model, prompts, **params)`, the flags of `gptforge generate` "
     "and `gptforge chat` (`--max-new-tokens`, `--top-p`, ...), and the matching OpenAI request fields of "
     "`gptforge serve`."),
    ("Server options", "gptforge.serve.app:ServerOptions",
     "the flags of `gptforge serve` (see `gptforge serve --help`), or `create_app(model, ServerOptions(...))`."),
    ("Moderation policy", "gptforge.safety:ModerationConfig",
     "the YAML file given to `--moderation FILE` (see [safety.md](safety.md))."),
    ("Moderation rule set", "gptforge.safety:RuleSet",
     "the `input:` and `output:` sections of a moderation policy."),
]


# Descriptions for fields whose source has no comment (checked: a name that is not a field is an error).
FALLBACK: dict[str, str] = {
    "Config.name": "preset or model name, recorded in config.json",
    "Config.vocab_size": "number of token ids (the tokenizer's vocabulary, often rounded up)",
    "Config.n_layer": "number of Transformer blocks",
    "Config.n_head": "attention (query) heads per block",
    "Config.n_embd": "width of the residual stream (hidden size)",
    "Config.pos_embedding": "position encoding: learned table (GPT-2), fixed sinusoidal, rotary (Llama) or none",
    "Config.rope_theta": "RoPE base frequency",
    "Config.norm": "LayerNorm (GPT-2) or RMSNorm (Llama)",
    "Config.norm_eps": "epsilon of the normalisation layers",
    "Config.mlp": "GELU MLP (GPT-2) or SwiGLU gated MLP (Llama)",
    "Config.tie_embeddings": "share the input embedding and the output head weights",
    "Config.attn_dropout": "dropout on attention weights (training only)",
    "Config.embd_dropout": "dropout on the embeddings (training only)",
    "Config.init_std": "standard deviation of the normal weight init (residual projections are scaled by 1/sqrt(2 n_layer))",
    "Config.bos_token_id": "beginning-of-sequence token id, saved to config.json",
    "Config.eos_token_id": "end-of-sequence token id, saved to config.json",
    "Config.pad_token_id": "padding token id, saved to config.json",
    "DataConfig.val_fraction": "share of the corpus held out for validation",
    "DataConfig.text_field": "field or column holding the text in JSONL/Parquet/HF data",
    "TrainConfig.lr": "peak learning rate (after warmup)",
    "TrainConfig.warmup_steps": "steps of linear warmup from 0 to lr",
    "TrainConfig.beta1": "AdamW first-moment decay",
    "TrainConfig.beta2": "AdamW second-moment decay",
    "TrainConfig.eps": "AdamW epsilon",
    "TrainConfig.seed": "seed for weights init, data order and dropout",
    "TrainConfig.early_stopping_metric": "metric returned by evaluation that early stopping and best/ watch",
    "TrainConfig.early_stopping_min_delta": "smallest change that counts as an improvement",
    "TrainConfig.tensorboard": "also write TensorBoard event files (when tensorboard is installed)",
    "TrainConfig.wandb_project": "also log to this Weights & Biases project (when wandb is installed)",
    "FinetuneRecipe.model": "model folder to fine-tune (or --model)",
    "FinetuneRecipe.out_dir": "run folder (or --out)",
    "FinetuneRecipe.dropout": "override the model's residual dropout while fine-tuning",
    "FinetuneRecipe.attn_dropout": "override the model's attention dropout while fine-tuning",
    "FinetuneRecipe.tasks": "the datasets of the run (see Fine-tuning task)",
    "FinetuneRecipe.data": "tokenization, batching and mixing (see Fine-tuning data)",
    "FinetuneRecipe.lora": "adapter settings when method is lora (see LoRA adapters)",
    "FinetuneRecipe.augment": "text augmentation of prompts (see Text augmentation)",
    "TaskRecipe.val_fraction": "share of `data` held out for validation when val_data is not given",
    "TaskRecipe.format": "record format or task template (auto detects it from the first record)",
    "TaskRecipe.source_lang": "translation: source language name used in the prompt",
    "TaskRecipe.target_lang": "translation: target language name used in the prompt",
    "DataSettings.temperature": "mixing temperature T when mixing is temperature",
    "DataSettings.seed": "seed of the task sampling and shuffling",
    "DataSettings.eval_batch_size": "examples per validation batch",
    "LoRAConfig.r": "adapter rank",
    "LoRAConfig.alpha": "scaling numerator: the update is scaled by alpha / r",
    "LoRAConfig.dropout": "dropout on the adapter input",
    "LoRAConfig.target_modules": "linears to wrap, by gptforge name (attn.qkv, attn.out, mlp.up, mlp.gate, mlp.down)",
    "AugmentConfig.deletion": "probability of deleting each word",
    "AugmentConfig.swap": "probability of swapping each word with its neighbour",
    "AugmentConfig.synonym": "probability of replacing a word that has synonyms",
    "AugmentConfig.synonyms": "word -> list of replacements",
    "SamplingParams.max_new_tokens": "most tokens to generate",
    "SamplingParams.min_new_tokens": "EOS is suppressed until this many tokens are generated",
    "SamplingParams.temperature": "divides the logits; lower is more deterministic",
    "SamplingParams.top_k": "keep the k most likely tokens (0: off)",
    "SamplingParams.top_p": "nucleus sampling: keep the smallest set with this total probability (1.0: off)",
    "SamplingParams.min_p": "drop tokens below min_p times the top probability (0: off)",
    "SamplingParams.typical_p": "locally typical sampling mass (1.0: off)",
    "SamplingParams.no_repeat_ngram_size": "forbid repeating any n-gram of this size (0: off)",
    "SamplingParams.logit_bias": "token id -> value added to its logit",
    "SamplingParams.stop": "strings that end generation (matched across token boundaries, not included)",
    "SamplingParams.eos_token_id": "token id(s) that end generation (default: the tokenizer's stop tokens)",
    "SamplingParams.seed": "seed of the sampling generator (reproducible outputs)",
    "SamplingParams.num_return_sequences": "continuations per prompt",
    "SamplingParams.num_beams": "beam search width (1: no beam search)",
    "SamplingParams.length_penalty": "beam search: scores are divided by length ** length_penalty",
    "SamplingParams.logprobs": "return the log-probability of each generated token",
    "SamplingParams.top_logprobs": "also return this many most likely alternatives per step",
    "ServerOptions.model_name": "the model name clients send (--served-model-name)",
    "ServerOptions.api_keys": "accepted API keys (--api-key, --api-keys-file, GPTFORGE_API_KEYS); empty: no auth",
    "ServerOptions.max_batch": "sequences decoded together (--max-concurrency)",
    "ServerOptions.max_queue": "waiting sequences before 429 with Retry-After (--max-queue)",
    "ServerOptions.request_timeout": "seconds before a request is cut off (--request-timeout)",
    "ServerOptions.max_body_bytes": "larger request bodies get 413 (--max-body-bytes)",
    "ServerOptions.requests_per_minute": "per API key (--rate-limit-rpm); None: unlimited",
    "ServerOptions.tokens_per_minute": "prompt + max completion tokens per API key (--rate-limit-tpm); None: unlimited",
    "ServerOptions.log_json": "structured JSON access logs",
}


def _render_type(cls: type, kind: str) -> str:
    """A type annotation, with Literal aliases (e.g. `PosEmbedding`) spelled out as their values."""
    alias = getattr(sys.modules[cls.__module__], kind, None)
    if getattr(alias, "__origin__", None) is Literal:
        return " \\| ".join(f"`{v!r}`" for v in get_args(alias))
    return f"`{_cell(kind)}`"


def field_comments(cls: type) -> dict[str, str]:
    """Map field name -> the comment written beside (or directly above) its definition."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, is the whole line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            whole_line = tok.line.strip().startswith("#")
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), whole_line)
    names = {f.name for f in dataclasses.fields(cls)}
    result: dict[str, str] = {}
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if ":" not in stripped or name not in names or name in result or not line.startswith("    ") \
                or line.startswith("     "):
            continue
        parts = []
        above = number - 1
        while above in comments and comments[above][1]:
            parts.insert(0, comments[above][0])
            above -= 1
        if number in comments and not comments[number][1]:
            parts.append(comments[number][0])
        result[name] = " ".join(parts)
    return result


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return f"`{type(value).__name__}()`"
    else:
        return "required"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The full Markdown page."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python tools/config_reference.py` from the config dataclasses; do not edit by hand."
        " tests/docs/test_config_reference.py fails when this page is out of date. -->",
        "",
        "Every recipe and command uses one scheme: dataclasses filled from YAML, with dotted command-line",
        "overrides such as `--train.lr=3e-4` applied on top (`gptforge.config.apply_overrides`). Every value",
        "is checked against the type below, and a mistake is one line naming the file (or the command line),",
        "the field, the value and what was expected: `tiny.yaml: train.max_steps must be an integer, got",
        "'five'`. Unknown names get the closest known one: `unknown field model.n_layers; did you mean",
        "n_layer?`. A YAML syntax error names the file, line and column.",
        "",
    ]
    for heading, target, where in SECTIONS:
        module_name, class_name = target.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        comments = field_comments(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for key, text in FALLBACK.items():
            owner, name = key.split(".")
            if owner == class_name:
                if name not in names:  # a removed field: its description is unused, say so
                    print(f"note: FALLBACK describes {key}, which is no longer a field", file=sys.stderr)
                    continue
                comments[name] = comments.get(name) or text
        out += [f"## {heading}", "", f"`{module_name}.{class_name}`: {doc}", "", f"Set in: {where}", "",
                "| field | type | default | description |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append(f"| `{f.name}` | {_render_type(cls, kind)} | {_cell(_default(f))} "
                       f"| {_cell(comments.get(f.name, ''))} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is out of date; run: python tools/config_reference.py", file=sys.stderr)
            return 1
        print(f"{args.output} is current")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "src"))
    from gptforge.atomic import atomic_write_text

    atomic_write_text(args.output, text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
