"""Load test of `gptforge serve`: generated tokens/s and time-to-first-token at concurrency 1, 4 and 16.

A small random-weight model (preset `micro` by default, with a byte-level BPE tokenizer) is saved and
served by the real CLI in a subprocess on 127.0.0.1. Streaming completions with a fixed length (EOS
banned through logit_bias) are fired by an asyncio client at each concurrency. The peer, measured in
the same run, is the same server with continuous batching off (`--max-concurrency 1`: requests are
served one after another) at the highest concurrency. Prints one JSON object:
our figures per concurrency, the peer's, their ratio, and the batching speedup at 16 over 1.

    python benchmarks/serve_load.py                         # the full run (about a minute on 2 cores)
    python benchmarks/serve_load.py --preset nano --requests-per-level 8 --max-tokens 16   # a smoke run
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


def build_model(directory: Path, preset: str) -> tuple[str, list[int]]:
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
    def __init__(self, model_dir: Path, max_concurrency: int, threads: int | None, extra: list[str] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gptforge.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--max-concurrency", str(max_concurrency), "--max-queue", "256"]
        if threads:
            cmd += ["--threads", str(threads)]
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("gptforge serve exited during startup")
            time.sleep(0.2)
        raise RuntimeError("gptforge serve did not become healthy")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def one_request(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float, int]:
    """(time to first token, generated tokens) of one streamed completion."""
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro", help="gptforge config preset (default: micro, 1.3M params)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server (default: the server's, all cores but one)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

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
        "benchmark": "serve_load",
        "date": time.strftime("%Y-%m-%d"),
        "hardware": f"{os.cpu_count()} CPU cores (no GPU)",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "model": {"preset": args.preset, "max_tokens": args.max_tokens},
        "server_threads": args.threads or max(1, (os.cpu_count() or 1) - 1),
        "gptforge_continuous_batching": ours,
        "peer_no_batching": {**peer, "server": "--max-concurrency 1 (one request at a time)"},
        f"ratio_tokens_per_s_at_{top}": round(by_c[top]["tokens_per_s"] / peer["tokens_per_s"], 2),
        "speedup_16_over_1": (round(by_c[16]["tokens_per_s"] / by_c[1]["tokens_per_s"], 2)
                              if 16 in by_c and 1 in by_c else None),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
