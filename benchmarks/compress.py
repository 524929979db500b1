"""Compression trade-off report: size on disk, decode tokens/s and perplexity for fp32, bf16, int8, int4, pruned.

Two models, because the two kinds of column need different things:
- speed + size: a GPT-2-124M-shaped model (random init; decode speed does not depend on the values). At batch 1
  a decode step reads every weight once, so tokens/s is set by weight bytes: the model must be big enough
  for those to dominate, as they do in real use.
- perplexity: a small model trained briefly on tinyshakespeare (needs ../shared/data/tinyshakespeare.txt or
  --text; those columns are skipped without it), evaluated on held-out text (the last 10%).
Ratios are against fp32 measured in the same run; variants are timed round-robin so load drifts hit all alike.
The peer is llama.cpp (llama-cpp-python, Q8_0 GGUF of the same 124M model) when it is installed.

    python benchmarks/compress.py --out bench-compress          # full (a few minutes on 2 cores)
    python benchmarks/compress.py --quick --out /tmp/bc         # smoke run: tiny speed model, few steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gptforge.compress import quantize_model, structured_prune, wanda_prune
from gptforge.compress.prune import TokenWindows, calibration_batches, recover_finetune
from gptforge.config import Config
from gptforge.model import GPT, causal_lm_loss
from gptforge.tokenizer import Tokenizer
from gptforge.loading import load_model, save  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = ("fp32", "bf16", "int8", "int4", "pruned50")


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def make_variant(name: str, base_dir: Path, calibration: Optional[list[torch.Tensor]] = None) -> GPT:
    """Load the fp32 model from `base_dir` and turn it into the named variant."""
    model = load_model(base_dir)
    if name == "bf16":
        return model.to(torch.bfloat16)
    if name in ("int8", "int8-dyn"):
        return quantize_model(model, "int8", dynamic_activations=name == "int8-dyn")
    if name == "int4":
        return quantize_model(model, "int4", group_size=32)
    if name == "pruned50":
        return structured_prune(model, 0.5, calibration)
    if name == "wanda50":
        return wanda_prune(model, 0.5, calibration)
    return model


def save_variant(model: GPT, directory: Path) -> int:
    if hasattr(model, "quantization_config"):
        save(directory, model)
    else:
        save(directory, model)
    return dir_size(directory)


@torch.no_grad()
def decode_step_timer(model: GPT, prompt_len: int, new_tokens: int) -> Callable[[], tuple[float, float]]:
    """A callable that prefills `prompt_len` tokens then greedily decodes `new_tokens`: (prefill s, decode tok/s)."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[float, float]:
        model.setup_cache(1, prompt_len + new_tokens + 1)
        t0 = time.perf_counter()
        logits = model(prompt, cache_slots=torch.arange(prompt_len), last_only=True)
        t1 = time.perf_counter()
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(new_tokens):
            logits = model(token, cache_slots=torch.tensor([prompt_len + i]))
            token = logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        model.clear_cache()
        return t1 - t0, new_tokens / (t2 - t1)

    return run


def llama_cpp_timer(gguf_path: Path, prompt_len: int, new_tokens: int) -> Optional[Callable[[], tuple[float, float]]]:
    """The same measurement through llama-cpp-python, or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=prompt_len + new_tokens + 8,
                          n_threads=torch.get_num_threads(),
                          n_batch=prompt_len, verbose=False)
    prompt = torch.randint(0, llm.n_vocab(), (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def run() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            token = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([token])
        t2 = time.perf_counter()
        return t1 - t0, new_tokens / (t2 - t1)

    return run


def speed_table(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """Size on disk, prefill time and decode tokens/s of each variant of the speed model."""
    config = Config.from_name(args.speed_model) if not args.quick else Config.from_name("micro", vocab_size=8192)
    torch.manual_seed(0)
    base = work / "speed-fp32"
    save(base, GPT(config).eval())
    names = list(VARIANTS) + ["int8-dyn"]
    models, rows = {}, {}
    for name in names:
        model = make_variant(name, base)
        rows[name] = {"size_mb": save_variant(model, work / f"speed-{name}") / 1e6,
                      "params": model.num_params() if not hasattr(model, "quantization_config") else config.num_params()}
        models[name] = decode_step_timer(model, args.prompt_len, args.decode_tokens)
        models[name]()  # warm-up (allocator, kernels' first call)
        print(f"[speed] built {name}: {rows[name]['size_mb']:.1f} MB on disk", file=sys.stderr)
    peer = None
    if not args.no_llama_cpp:
        try:
            from gptforge.interop.gguf import export_gguf

            tok = Tokenizer.train_bpe(["a b c " * 10], 300)
            gguf_path = export_gguf(load_model(base), work / "speed-q8_0.gguf", tokenizer=tok, outtype="q8_0")
            peer = llama_cpp_timer(gguf_path, args.prompt_len, args.decode_tokens)
            if peer is not None:
                peer()
                models["llama.cpp-q8_0"] = peer
                rows["llama.cpp-q8_0"] = {"size_mb": gguf_path.stat().st_size / 1e6, "params": config.num_params()}
        except Exception as exc:  # the peer is optional; say why it is missing
            print(f"[speed] llama.cpp peer skipped: {exc}", file=sys.stderr)
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in models}
    for round_ in range(args.rounds):
        for name, run in models.items():
            samples[name].append(run())
        print(f"[speed] round {round_ + 1}/{args.rounds}: " + ", ".join(
            f"{n} {samples[n][-1][1]:.1f} tok/s" for n in models), file=sys.stderr)
    base_runs = samples["fp32"]
    for name in models:
        runs = samples[name]
        rows[name]["decode_tok_s"] = statistics.median(s[1] for s in runs)
        rows[name]["prefill_ms"] = 1e3 * statistics.median(s[0] for s in runs)
        # Ratios per round (the same load for both sides), then their median.
        rows[name]["decode_x_fp32"] = statistics.median(r[1] / b[1] for r, b in zip(runs, base_runs))
        rows[name]["prefill_x_fp32"] = statistics.median(b[0] / r[0] for r, b in zip(runs, base_runs))
        rows[name]["decode_tok_s_rounds"] = [round(r[1], 2) for r in runs]
        rows[name]["size_x_fp32"] = rows[name]["size_mb"] / rows["fp32"]["size_mb"]
    return rows


@torch.no_grad()
def perplexity(model: GPT, ids: torch.Tensor, seq_len: int, max_windows: int) -> float:
    """exp(mean NLL) over non-overlapping windows of the held-out token stream."""
    total, count = 0.0, 0
    starts = list(range(0, ids.numel() - seq_len - 1, seq_len))[:max_windows]
    for s in starts:
        window = ids[s: s + seq_len + 1][None]
        loss = causal_lm_loss(model(window[:, :-1]).float(), window[:, 1:])
        total += float(loss) * seq_len
        count += seq_len
    return math.exp(total / count)


def quality_table(args: argparse.Namespace, work: Path) -> Optional[dict[str, dict[str, Any]]]:
    """Perplexity on held-out tinyshakespeare of each variant of a small trained model."""
    text_path = Path(args.text)
    if not text_path.is_file():
        print(f"[ppl] {text_path} not found: perplexity columns skipped", file=sys.stderr)
        return None
    text = text_path.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    base = Path(args.ppl_model) if args.ppl_model else Path(args.out) / "ppl-model"  # reused by later runs
    if not (base / "config.json").is_file():
        from gptforge.train.loop import TrainConfig, train

        tokenizer = Tokenizer.train_bpe([text[:split]], 1024)
        config = Config.from_name("micro", vocab_size=1024, block_size=128, n_layer=4, n_head=4, n_embd=128)
        torch.manual_seed(0)
        model = GPT(config)
        train_ids = tokenizer.encode(text[:split])
        cfg = TrainConfig(max_steps=args.train_steps, lr=3e-3, warmup_steps=20, device="cpu", weight_decay=0.1,
                          progress=True, save_best=False)
        train(model, cfg, TokenWindows(train_ids, 16, 128), work / "ppl-run", save_model=lambda m, d: None)
        save(base, model.eval(), tokenizer)
    tokenizer = Tokenizer.from_file(base)
    held = torch.tensor(tokenizer.encode(text[split:]))
    calibration = calibration_batches(tokenizer.encode(text[:split]), 128, 16)
    rows: dict[str, dict[str, Any]] = {}
    for name in list(VARIANTS) + ["pruned50+recover", "wanda50"]:
        model = make_variant(name.split("+")[0], base, calibration)
        if name.endswith("+recover"):
            model = model.float()
            recover_finetune(model, tokenizer.encode(text[:split]), str(work / "recover-run"),
                             steps=args.recover_steps, lr=1e-3, batch_size=16, seq_len=128)
        ppl = perplexity(model, held, 128, args.eval_windows)
        rows[name] = {"ppl": ppl, "ppl_size_mb": save_variant(model, work / f"ppl-{name}") / 1e6}
        print(f"[ppl] {name}: {ppl:.3f}", file=sys.stderr)
    for row in rows.values():
        row["ppl_x_fp32"] = row["ppl"] / rows["fp32"]["ppl"]
    return rows


def plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Decode speed (x fp32) vs perplexity (x fp32), one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptforge.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        if "decode_x_fp32" in row and "ppl_x_fp32" in row:
            ax.scatter(row["decode_x_fp32"], row["ppl_x_fp32"])
            ax.annotate(name, (row["decode_x_fp32"], row["ppl_x_fp32"]), textcoords="offset points", xytext=(4, 4))
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("decode tokens/s, x fp32 (GPT-2 124M shape, batch 1)")
    ax.set_ylabel("held-out perplexity, x fp32 (small model)")
    ax.set_title("gptforge compression: speed vs quality")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-compress", help="folder for compress.json and compress.png")
    parser.add_argument("--speed-model", default="gpt2", help="preset for the speed/size columns (default gpt2)")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="training/held-out text for the ppl columns")
    parser.add_argument("--ppl-model", help="trained model directory for the ppl columns (default: OUT/ppl-model, "
                        "trained on the first run and reused after)")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: 2, or 1 when the 1-minute load average exceeds 2: on a busy "
                             "2-core machine two OpenMP threads spend most of a step waiting for each other)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_steps, args.recover_steps, args.eval_windows = 20, 5, 4
        args.prompt_len, args.decode_tokens, args.rounds = 16, 8, 1
    load_before = os.getloadavg()
    if args.threads <= 0:
        args.threads = 1 if load_before[0] > 2.0 else 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-compress-") as tmp:
        work = Path(tmp)
        speed = speed_table(args, work)
        quality = quality_table(args, work)
    rows: dict[str, dict[str, Any]] = {k: dict(v) for k, v in speed.items()}
    for name, row in (quality or {}).items():
        rows.setdefault(name, {}).update(row)
    result = {
        "benchmark": "compress",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_threads": args.threads, "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "speed_model": f"{args.speed_model} preset (random init), batch 1, prompt {args.prompt_len}, "
                       f"{args.decode_tokens} decode tokens, median of {args.rounds} round-robin rounds "
                       "(ratios: median of per-round ratios)",
        "ppl_model": "micro-shaped GPT-2 (4 layers, 128 dims, BPE 1024) trained "
                     f"{args.train_steps} steps on tinyshakespeare (first 90%), ppl on the last 10%",
        "pruned50": "structured: half the heads and half the MLP channels per layer (heads method, Wanda-style scores)",
        "wanda50": "unstructured 50% Wanda (dense zeros: same size and speed as fp32)",
        "peer": "llama.cpp Q8_0 via llama-cpp-python" if "llama.cpp-q8_0" in rows else "fp32 (llama.cpp absent)",
        "rows": rows,
    }
    (out / "compress.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "compress.png")
    header = f"{'variant':18} {'size MB':>8} {'x fp32':>7} {'decode tok/s':>12} {'x fp32':>7} " \
             f"{'prefill ms':>10} {'ppl':>8} {'x fp32':>7}"
    print(header)
    for name, row in rows.items():
        def cell(key: str, fmt: str, width: int) -> str:
            return format(row[key], fmt).rjust(width) if key in row else "-".rjust(width)
        print(f"{name:18} {cell('size_mb', '.1f', 8)} {cell('size_x_fp32', '.2f', 7)} "
              f"{cell('decode_tok_s', '.1f', 12)} {cell('decode_x_fp32', '.2f', 7)} {cell('prefill_ms', '.0f', 10)} "
              f"{cell('ppl', '.3f', 8)} {cell('ppl_x_fp32', '.4f', 7)}")
    print(f"load average before/after: {load_before} / {result['machine']['loadavg_after']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
