"""Load test of `gptforge serve`: generated tokens/s and time-to-first-token at several concurrencies.

A random-weight model (with a byte-level BPE tokenizer) is saved and served by the real CLI in a
subprocess on 127.0.0.1. Streaming completions with a fixed length (EOS banned through logit_bias) are
fired by an asyncio client at each concurrency. The peer, measured in the same run, is either
- `--peer batching-off` (default): the same server with continuous batching off (`--max-concurrency 1`)
  at the highest concurrency; or
- `--peer llama-server`: llama.cpp's server ($LLAMACPP_BIN/llama-server) on the same weights
  (`gptforge export --format gguf`), one slot per concurrent request, with the same request mix; the two
  servers are measured back to back per level and round (`--repeats`), and figures are medians.
Prints one JSON object: our figures per concurrency, the peer's, and their ratios.

    python benchmarks/serve_load.py                         # the full run (about a minute on 2 cores)
    python benchmarks/serve_load.py --preset nano --requests-per-level 8 --max-tokens 16   # a smoke run
    LLAMACPP_BIN=/root/.cache/llamacpp/bin python benchmarks/serve_load.py --peer llama-server \
        --preset llama-small --concurrency 1,16 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CORPUS = ["The quick brown fox jumps over the lazy dog. ", "def add(a, b):\n    return a + b\n",
          "Once upon a time a server answered many requests at once. "]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(directory: Path, preset: str) -> tuple[Path, list[int]]:
    """Save a random-weight model + BPE tokenizer; return its served name and the ids to ban (EOS)."""
    import torch

    from gptforge.loading import save
    from gptforge.model import GPT
    from gptforge.tokenizer import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(CORPUS * 50, vocab_size=512)
    model = GPT.from_config(preset, vocab_size=tokenizer.vocab_size)
    path = directory / f"serve-bench-{preset}"
    save(path, model, tokenizer)
    return path, tokenizer.stop_token_ids()


class Server:
    """`gptforge serve` (or, with `cmd`, another OpenAI-compatible server) in a subprocess until exit."""

    name = "gptforge serve"

    def __init__(self, model_dir: Path, max_concurrency: int, threads: int | None, extra: list[str] = (),
                 cmd: list[str] | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if cmd is None:
            cmd = [sys.executable, "-m", "gptforge.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
                   "--max-concurrency", str(max_concurrency), "--max-queue", "256"]
            if threads:
                cmd += ["--threads", str(threads)]
            cmd += list(extra)
        self.log = log
        sink = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen([c.replace("{port}", str(self.port)) for c in cmd],
                                     stdout=sink, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during startup")
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not become healthy")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def llama_server(binaries: Path, gguf: Path, slots: int, context: int, threads: int | None) -> Server:
    """llama.cpp's server on `gguf` with `slots` parallel sequences of `context` tokens each."""
    cmd = [str(binaries / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}",
           "-np", str(slots), "-c", str(context * slots), "--no-webui"]
    if threads:
        cmd += ["-t", str(threads)]
    server = Server(gguf, slots, threads, cmd=cmd, log=gguf.with_suffix(".log"))
    server.name = "llama-server"
    return server


async def one_request(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float, int]:
    """(time to first token, generated tokens) of one streamed completion.

    Tokens are the usage's completion_tokens, or (a server without streamed usage) the text chunks."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    chunks = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens or chunks


async def run_level(base: str, model: str, concurrency: int, requests: int, body: dict) -> dict:
    """Fire `requests` completions with at most `concurrency` in flight; tokens/s and TTFT percentiles."""
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def task(i: int):
            async with semaphore:
                return await one_request(client, base, {**body, "model": model, "prompt": f"{CORPUS[i % 3]} {i}"})

        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": requests, "generated_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p95_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 1),
            "wall_s": round(wall, 2)}


def median_level(samples: list[dict]) -> dict:
    """Per-field medians of one level's rounds."""
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "wall_s")
    return {**samples[0], **{k: round(statistics.median(r[k] for r in samples), 1) for k in keys},
            "rounds": len(samples)}


def compare_llama_server(args: argparse.Namespace, levels: list[int]) -> dict:
    """Ours and llama-server on the same weights and request mix, back to back per level and round."""
    binaries = Path(os.environ.get("LLAMACPP_BIN", ""))
    if not os.environ.get("LLAMACPP_BIN") or not (binaries / "llama-server").is_file():
        return {"benchmark": "serve_load", "skipped": "--peer llama-server: set LLAMACPP_BIN to a folder with "
                "llama.cpp's llama-server; nothing was measured"}
    top = max(levels)
    ours: dict[int, list] = {c: [] for c in levels}
    theirs: dict[int, list] = {c: [] for c in levels}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, eos_ids = build_model(Path(tmp), args.preset)
        gguf = Path(tmp) / "model.gguf"
        done = subprocess.run([sys.executable, "-m", "gptforge.cli", "export", "--model", str(model_dir),
                               "--format", "gguf", "--out", str(gguf), "--dtype", args.gguf_type],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"gguf export failed: {done.stderr[-2000:]}")
        from gptforge.config import Config

        context = Config.from_name(args.preset).block_size
        body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in eos_ids}}
        peer_body = {**body, "ignore_eos": True}  # llama-server's own switch; logit_bias alone is honoured too
        name = model_dir.name
        with Server(model_dir, top, args.threads) as server, \
                llama_server(binaries, gguf, top, context, args.threads) as peer:
            for base, b in ((server.base, body), (peer.base, peer_body)):
                asyncio.run(run_level(base, name, 2, 2, b))  # warm-up
            for round_ in range(args.repeats):
                for c in levels:
                    n = max(args.requests_per_level, c)
                    ours[c].append(asyncio.run(run_level(server.base, name, c, n, body)))
                    try:
                        theirs[c].append(asyncio.run(run_level(peer.base, name, c, n, peer_body)))
                    except httpx.HTTPError as exc:
                        tail = peer.log.read_bytes()[-1500:].decode(errors="replace") if peer.log else ""
                        raise RuntimeError(f"llama-server failed ({exc!r}); its log ends:\n{tail}") from exc
                    print(f"round {round_ + 1}/{args.repeats} concurrency {c}: ours {ours[c][-1]['tokens_per_s']} "
                          f"tok/s, llama-server {theirs[c][-1]['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    levels_out = []
    for c in levels:
        a, b = median_level(ours[c]), median_level(theirs[c])
        levels_out.append({"concurrency": c, "gptforge": a, "llama_server": b,
                           "ratio_tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
                           "ratio_ttft_p50": round(a["ttft_p50_ms"] / max(b["ttft_p50_ms"], 1e-9), 3)})
    return {"peer": "llama-server", "gguf_type": args.gguf_type, "levels": levels_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro", help="gptforge config preset (default: micro, 1.3M params)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server(s) (default: each server's own default)")
    parser.add_argument("--peer", choices=["batching-off", "llama-server"], default="batching-off",
                        help="what to compare with (see the module docstring)")
    parser.add_argument("--gguf-type", default="f32", help="llama-server's weights: f32 | f16 | bf16 | q8_0 | q4_0")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per level with --peer llama-server (medians)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    header = {"benchmark": "serve_load", "date": time.strftime("%Y-%m-%d"),
              "hardware": f"{os.cpu_count()} CPU cores (no GPU)", "loadavg_before": [round(x, 2) for x in os.getloadavg()],
              "model": {"preset": args.preset, "max_tokens": args.max_tokens},
              "server_threads": args.threads or "default"}
    if args.peer == "llama-server":
        report = {**header, **compare_llama_server(args, levels)}
        report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(report, indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, eos_ids = build_model(Path(tmp), args.preset)
        body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in eos_ids}}
        name = model_dir.name
        ours = []
        with Server(model_dir, max(levels), args.threads) as server:
            asyncio.run(run_level(server.base, name, 2, 2, body))  # warm-up
            for c in levels:
                ours.append(asyncio.run(run_level(server.base, name, c, max(args.requests_per_level, c), body)))
        top = max(levels)
        with Server(model_dir, 1, args.threads) as server:
            asyncio.run(run_level(server.base, name, 1, 1, body))
            peer = asyncio.run(run_level(server.base, name, top, max(args.requests_per_level, top), body))

    by_c = {r["concurrency"]: r for r in ours}
    report = {
        **header,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "gptforge_continuous_batching": ours,
        "peer_no_batching": {**peer, "server": "--max-concurrency 1 (one request at a time)"},
        f"ratio_tokens_per_s_at_{top}": round(by_c[top]["tokens_per_s"] / peer["tokens_per_s"], 2),
        "speedup_16_over_1": (round(by_c[16]["tokens_per_s"] / by_c[1]["tokens_per_s"], 2)
                              if 16 in by_c and 1 in by_c else None),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
