"""`gptforge serve`: an OpenAI-compatible HTTP API and chat page over a saved model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `gptforge serve`."""
    parser.add_argument("--model", required=True, help="model directory (config.json + safetensors + tokenizer)")
    parser.add_argument("--served-model-name", default=None,
                        help="the `model` name clients send (default: the run's name, e.g. demo for runs/demo/model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="accepted API key (repeatable; also GPTFORGE_API_KEYS=k1,k2 and --api-keys-file)")
    parser.add_argument("--api-keys-file", default=None, help="file with one API key per line")
    parser.add_argument("--max-concurrency", type=int, default=8,
                        help="sequences decoded together in the running batch (KV cache rows)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting sequences before 429 + Retry-After")
    parser.add_argument("--prefix-cache-mb", type=float, default=256.0, metavar="MB",
                        help="memory for the keys/values of prompt prefixes that requests share (a system prompt, "
                             "a chat's history), reused instead of recomputed; least recently used blocks go first "
                             "(default 256; 0 turns prefix caching off)")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                        help="serve a LoRA adapter (PEFT layout, as `gptforge finetune --method lora` writes it) "
                             "beside the model as `model: NAME`; repeatable, and requests for different adapters "
                             "are batched together")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cut off")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413")
    parser.add_argument("--rate-limit-rpm", type=int, default=None, help="requests per minute per API key")
    parser.add_argument("--rate-limit-tpm", type=int, default=None,
                        help="tokens (prompt + max completion) per minute per API key")
    parser.add_argument("--redact-pii", nargs="?", const="logs", default="off", choices=["off", "logs", "content"],
                        help="mask emails, phones, cards, IPs... in logs ('logs'), or also in prompts and outputs "
                             "('content')")
    parser.add_argument("--moderation", default=None, metavar="FILE",
                        help="moderation policy YAML (see docs/safety.md): blocked prompts and outputs get "
                             "the refusal with finish_reason content_filter")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores but one, kept for the HTTP event loop)")
    parser.add_argument("--embedding-pooling", default="last", choices=["last", "mean"],
                        help="how /v1/embeddings pools the final norm's output: the last token (default) or the mean")
    parser.add_argument("--feedback-db", default=None, metavar="FILE|URL",
                        help="where POST /v1/feedback and the chat page's ratings go: a SQLite file, sqlite:///FILE or "
                             "postgresql://USER@HOST/DB (default: feedback.db beside the model folder; 'off' disables)")
    parser.add_argument("--feedback-retention", type=float, default=86_400.0, metavar="SECONDS",
                        help="how long responses are kept so that feedback can refer to them by id (default 1 day)")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                        help="prompt-lookup speculative decoding: while one sequence decodes alone, draft up to N "
                             "tokens from its context and verify them in one pass (same output; faster on text "
                             "that repeats its context, such as code edits). 0: off; a request's "
                             "prompt_lookup_num_tokens overrides it")
    parser.add_argument("--prompt-lookup-ngram", type=int, default=2, metavar="N",
                        help="the longest n-gram matched when drafting (default 2)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds to let in-flight requests finish on SIGTERM")


def run(args: argparse.Namespace) -> int:
    """Start the server (blocks until SIGINT/SIGTERM)."""
    from .decoding_args import passive_openmp

    passive_openmp()  # idle compute threads must not spin on the event loop's core
    import torch

    from ..serve.app import ServerOptions, create_app, load_model_dir, run_server
    from ..serve.auth import collect_keys
    from ..serve.protocol import MAX_LOOKUP, MAX_LOOKUP_NGRAM

    model_dir = Path(args.model)
    if not model_dir.exists():
        raise FileNotFoundError(f"--model: model directory not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json there (expected a saved model directory)")
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--max-queue", args.max_queue),
                        ("--port", args.port)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.prompt_lookup <= MAX_LOOKUP:
        raise ValueError(f"--prompt-lookup must be in [0, {MAX_LOOKUP}] (0 turns it off), got {args.prompt_lookup}")
    if not 1 <= args.prompt_lookup_ngram <= MAX_LOOKUP_NGRAM:
        raise ValueError(f"--prompt-lookup-ngram must be in [1, {MAX_LOOKUP_NGRAM}], got {args.prompt_lookup_ngram}")
    if not args.prefix_cache_mb >= 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), got {args.prefix_cache_mb}")
    if not args.feedback_retention > 0:
        raise ValueError(f"--feedback-retention must be a positive number of seconds, got {args.feedback_retention}")
    # Leave one core to the HTTP event loop: OpenMP workers spin between matmuls, and an event loop
    # starved of a core streams tokens many times slower (measured: 20x on a busy 2-core host).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - 1))
    from ..serve.multi_lora import parse_lora_flags

    model_name = args.served_model_name or served_name(model_dir)
    lora = parse_lora_flags(args.lora, model_name)
    options = ServerOptions(
        model_name=model_name, lora=lora,
        api_keys=collect_keys(args.api_key, args.api_keys_file),
        max_batch=args.max_concurrency, max_queue=args.max_queue, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, requests_per_minute=args.rate_limit_rpm,
        tokens_per_minute=args.rate_limit_tpm, redact_pii=args.redact_pii, moderation=args.moderation,
        embedding_pooling=args.embedding_pooling, prefix_cache_mb=args.prefix_cache_mb, feedback_db=_feedback_db(args, model_dir),
        feedback_retention=args.feedback_retention, prompt_lookup=args.prompt_lookup,
        prompt_lookup_ngram=args.prompt_lookup_ngram)
    app = create_app(load_model_dir(model_dir, args.dtype), options)
    print(f"gptforge serve: {options.model_name} on http://{args.host}:{args.port} "
          f"({'API keys required' if options.api_keys else 'no API keys configured'}; feedback "
          f"{'to ' + app.state.server.feedback.store.name if app.state.server.feedback else 'off'})", flush=True)
    run_server(app, args.host, args.port, graceful_timeout=args.graceful_timeout)
    return 0


# Folder names a run gives its models (gptforge pretrain/finetune/demo): the run folder above names the model.
RUN_MODEL_FOLDERS = ("model", "best", "merged")


def served_name(model_dir: Path) -> str:
    """The default `model` name: runs/x/model -> "x", runs/x/best -> "x-best", any other folder -> its own name."""
    path = model_dir.resolve()
    if path.name in RUN_MODEL_FOLDERS and path.parent.name:
        return path.parent.name if path.name == "model" else f"{path.parent.name}-{path.name}"
    return path.name


def _feedback_db(args: argparse.Namespace, model_dir: Path) -> str | None:
    """--feedback-db, or feedback.db beside the model folder when that place is writable (else feedback is off)."""
    if args.feedback_db is not None:
        return None if args.feedback_db.strip().lower() in ("off", "none", "") else args.feedback_db
    default = model_dir.resolve().parent / "feedback.db"
    if os.access(default if default.exists() else default.parent, os.W_OK):
        return str(default)
    print(f"gptforge serve: {default.parent} is not writable, so feedback is off (give --feedback-db FILE|URL)",
          flush=True)
    return None
