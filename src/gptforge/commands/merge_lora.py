"""`gptforge merge-lora`: fold a LoRA adapter into its base model and write a plain model folder.

    gptforge merge-lora --adapter runs/ft/model [--base runs/base/model] --out runs/ft-merged
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", default=None,
                        help="base model folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--out", required=True, help="output model folder")


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_directory
    from ..finetune.classifier import SequenceClassifier
    from ..finetune.runner import load_finetuned
    from ..loading import save
    from ..finetune.lora import lora_modules, merge_lora

    if Path(args.out).resolve() in (Path(args.adapter).resolve(), Path(args.base or args.adapter).resolve()):
        raise ValueError("--out must differ from --adapter and --base")
    model, tokenizer = load_finetuned(args.adapter, args.base)
    body = model.body if isinstance(model, SequenceClassifier) else model
    count = len(lora_modules(body))
    if not count:
        raise ValueError(f"--adapter {args.adapter}: no LoRA layers were loaded")
    merge_lora(body)
    with atomic_directory(args.out) as tmp:
        if isinstance(model, SequenceClassifier):
            model.save_pretrained(tmp, tokenizer)  # the body as a model folder, plus the head
        else:
            save(tmp, model, tokenizer)
    print(f"merged {count} LoRA layers of {args.adapter} into {args.out}")
    return 0
