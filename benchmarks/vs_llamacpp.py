"""gptforge against llama.cpp on the same CPU: batch-1 decode and prefill tokens/s per precision, same weights.

For each model shape (GPT-2-124M and llama-small by default, random init: speed does not depend on the
values) one fp32 model directory is saved, and from it:
- ours: fp32, bf16 and fp16 (`gptforge.load(dir, dtype=...)`), int8 and int4 (`gptforge quantize`), each
  loaded through the public API and run with `gptforge.generate.generate` and its default settings;
- llama.cpp's: `gptforge export --format gguf` with F32, BF16, F16, Q8_0 and Q4_0, timed by `llama-bench`.
Decode tokens/s = N / (time of generating N+1 tokens - time of generating 1), prefill = prompt tokens / time
of one forward over the prompt; llama-bench's tg<N> and pp<P> measure the same things. Both sides use the
same thread count and run back to back within each round (ours, then theirs, per precision), and the
figures are medians over the rounds, so machine load drifts hit both alike. Prints one JSON object.

    LLAMACPP_BIN=/root/.cache/llamacpp/bin python benchmarks/vs_llamacpp.py            # ~15 min on 2 cores
    LLAMACPP_BIN=... python benchmarks/vs_llamacpp.py --presets llama-nano --precisions fp32,int8 \\
        --new-tokens 8 --prompt-tokens 32 --repeats 1                                  # a smoke run
Without LLAMACPP_BIN (a folder with llama-bench) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

# What gptforge's decoding commands do before torch loads OpenMP (gptforge.commands.decoding_args): idle
# workers sleep instead of spinning. Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# precision -> (how ours is made, GGUF type of the peer)
PRECISIONS = {"fp32": ("float32", "f32"), "bf16": ("bfloat16", "bf16"), "f16": ("float16", "f16"),
              "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}
CORPUS = ["The quick brown fox jumps over the lazy dog. ", "def add(a, b):\n    return a + b\n",
          "Once upon a time a server answered many requests at once. "]


def llamacpp_bin() -> Optional[Path]:
    """The llama.cpp binaries folder from $LLAMACPP_BIN, or None when it has no llama-bench."""
    folder = os.environ.get("LLAMACPP_BIN")
    if folder and (Path(folder) / "llama-bench").is_file():
        return Path(folder)
    return None


def cli(*args: str) -> None:
    """Run a gptforge command in a subprocess (as a user would); raise with its stderr if it fails."""
    done = subprocess.run([sys.executable, "-m", "gptforge.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"gptforge {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")


def build_models(work: Path, preset: str, precisions: list[str]) -> dict[str, tuple[Path, Optional[str], Path]]:
    """Save the fp32 model, its quantized variants and GGUF exports; precision -> (dir, dtype, gguf)."""
    from gptforge.loading import save
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(CORPUS * 50, vocab_size=512)  # GGUF export pads it to the model's vocab
    base = work / preset
    save(base, GPT.from_config(preset), tokenizer)
    out = {}
    for name in precisions:
        how, gguf_type = PRECISIONS[name]
        gguf = work / f"{preset}-{gguf_type}.gguf"
        cli("export", "--model", str(base), "--format", "gguf", "--out", str(gguf), "--dtype", gguf_type)
        if how in ("int8", "int4"):
            directory = work / f"{preset}-{how}"
            cli("quantize", "--model", str(base), "--method", how, "--out", str(directory))
            out[name] = (directory, None, gguf)
        else:
            out[name] = (base, how, gguf)
    return out


def time_ours(directory: Path, dtype: Optional[str], new_tokens: int, prompt_tokens: int,
              compile: Optional[bool]) -> dict[str, float]:
    """Decode (batch 1) and prefill tokens/s of one model through `gptforge.load` + `generate`."""
    import gptforge
    from gptforge.generate import generate

    model, _ = gptforge.load(directory, dtype=dtype)
    vocab = model.config.vocab_size
    rng = torch.Generator().manual_seed(0)
    short = torch.randint(0, vocab, (16,), generator=rng).tolist()
    long = torch.randint(0, vocab, (prompt_tokens,), generator=rng).tolist()
    extra = {} if compile is None else {"compile": compile}

    def run(prompt: list[int], new: int) -> float:
        start = time.perf_counter()
        generate(model, [prompt], max_new_tokens=new, eos_token_id=[], **extra)
        return time.perf_counter() - start

    start = time.perf_counter()
    run(short, new_tokens + 1)  # warm-up (and the compile, when there is one)
    first_call = time.perf_counter() - start
    run(long, 1)
    # Best of two: the least disturbed by other processes within this round.
    full = min(run(short, new_tokens + 1) for _ in range(2))
    one = min(run(short, 1) for _ in range(2))
    prefill = min(run(long, 1) for _ in range(2))
    return {"decode_tok_s": new_tokens / max(full - one, 1e-9), "prefill_tok_s": prompt_tokens / prefill,
            "first_call_s": first_call}


def time_llamacpp(binaries: Path, gguf: Path, new_tokens: int, prompt_tokens: int, threads: int) -> dict[str, float]:
    """llama-bench's pp<P> and tg<N> tokens/s for one GGUF file (one repetition after its warm-up)."""
    cmd = [str(binaries / "llama-bench"), "-m", str(gguf), "-p", str(prompt_tokens), "-n", str(new_tokens),
           "-t", str(threads), "-r", "2", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama-bench failed on {gguf.name}: {done.stderr.strip()[-2000:]}")
    rows = json.loads(done.stdout)
    by_kind = {("prefill" if r["n_gen"] == 0 else "decode"): float(r["avg_ts"]) for r in rows}
    return {"decode_tok_s": by_kind["decode"], "prefill_tok_s": by_kind["prefill"]}


def median_figures(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(s[k] for s in samples), 2) for k in samples[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt2,llama-small", help="comma-separated config presets")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"any of {','.join(PRECISIONS)}")
    parser.add_argument("--threads", type=int, default=2, help="threads of both sides (default 2)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (llama-bench -n)")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="prefill length (llama-bench -p)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; figures are medians over them")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="our decode step: generate's default (auto), always compiled, or eager")
    args = parser.parse_args()
    binaries = llamacpp_bin()
    if binaries is None:
        print(json.dumps({"benchmark": "vs_llamacpp", "skipped": "set LLAMACPP_BIN to a folder with llama.cpp's "
                          "llama-bench (see DEVELOPERS.md); nothing was measured"}))
        return
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"--precisions: unknown {unknown}; expected some of {list(PRECISIONS)}")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        models = {preset: build_models(Path(tmp), preset, precisions) for preset in presets}
        samples: dict[tuple[str, str], dict[str, list[dict[str, float]]]] = {}
        for round_ in range(args.repeats):
            for preset in presets:
                for name in precisions:
                    directory, dtype, gguf = models[preset][name]
                    slot = samples.setdefault((preset, name), {"gptforge": [], "llamacpp": []})
                    slot["gptforge"].append(time_ours(directory, dtype, args.new_tokens, args.prompt_tokens,
                                                      compile))
                    slot["llamacpp"].append(time_llamacpp(binaries, gguf, args.new_tokens, args.prompt_tokens,
                                                          args.threads))
                    print(f"round {round_ + 1}/{args.repeats} {preset} {name}: ours {slot['gptforge'][-1]} "
                          f"llama.cpp {slot['llamacpp'][-1]}", file=sys.stderr, flush=True)
    results = []
    for (preset, name), slot in samples.items():
        ours, theirs = median_figures(slot["gptforge"]), median_figures(slot["llamacpp"])
        results.append({"preset": preset, "precision": name, "gguf_type": PRECISIONS[name][1].upper(),
                        "gptforge": ours, "llamacpp": theirs,
                        "ratio_decode": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3),
                        "ratio_prefill": round(ours["prefill_tok_s"] / theirs["prefill_tok_s"], 3),
                        "rounds": len(slot["gptforge"])})
    flags = _cpu_flags()
    report: dict[str, Any] = {
        "benchmark": "vs_llamacpp", "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "compile": args.compile,
        "cpu": {"cores": os.cpu_count(), "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
                "avx2": "avx2" in flags},
        "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "results": results,
    }
    print(json.dumps(report, indent=2))


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


if __name__ == "__main__":
    main()
