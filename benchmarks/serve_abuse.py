"""Hostile load on `gptforge serve`: many requests at high concurrency, a share of them hostile.

The real CLI serves a small random-weight model (with `--redact-pii content`, so masking runs on every
prompt) in a subprocess. An asyncio client sends N requests with C in flight; a fraction of them are
drawn from the hostile cases of issue 12 (overflowing sampling parameters, lone surrogates, null
max_tokens at the context limit, megabyte bodies, 100k stop strings, 2,000-item prompt lists, NaN,
adversarial PII text, malformed JSON). Prints one JSON object: the count of 5xx answers (must be 0),
p50/p95 latency of the well-formed requests, the statuses seen, and the server's RSS before and after.

    python benchmarks/serve_abuse.py                                  # 10,000 requests at 64 concurrent
    python benchmarks/serve_abuse.py --requests 500 --concurrency 16  # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Server, build_model  # noqa: E402  (same model and server harness)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


HOSTILE_KINDS = ("overflow", "surrogate", "null-max-tokens", "megabyte", "stop-strings", "prompt-list", "nan",
                 "pii-adversarial", "truncated-json", "tiny-temperature")


def hostile_body(rng: random.Random, model: str) -> tuple[str, str, bytes]:
    """(kind, path, raw JSON body) of one hostile request."""
    kind = rng.randrange(10)
    return (HOSTILE_KINDS[kind], *_hostile(kind, model))


def _hostile(kind: int, model: str) -> tuple[str, bytes]:
    if kind == 0:
        body = {"prompt": "Hello", "max_tokens": 20, "seed": 1, "temperature": 1e-37, "presence_penalty": -2,
                "frequency_penalty": -2}
    elif kind == 1:
        body = {"prompt": "a\ud800b", "max_tokens": 4}
    elif kind == 2:
        body = {"prompt": list(range(10, 10 + 255)), "max_tokens": None}
    elif kind == 3:
        body = {"prompt": "word " * 300_000, "max_tokens": 4}  # 1.5 MB
    elif kind == 4:
        body = {"prompt": "x", "stop": [f"s{i}" for i in range(100_000)]}
    elif kind == 5:
        body = {"prompt": ["x"] * 2000, "max_tokens": 1}
    elif kind == 6:
        return "/v1/completions", json.dumps({"model": model, "prompt": "x", "temperature": float("nan"),
                                              "top_p": float("inf")}).encode()
    elif kind == 7:
        body = {"prompt": "a." * 30_000 + "1 2 " * 10_000, "max_tokens": 2}  # adversarial for the PII patterns
    elif kind == 8:
        return "/v1/chat/completions", b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "con'
    else:
        return "/v1/chat/completions", json.dumps({"model": model, "max_tokens": 8, "temperature": 5e-45,
                                                   "messages": [{"role": "user", "content": "\u202e🙂\x00"}]},
                                                  ensure_ascii=True).encode()
    body["model"] = model
    return "/v1/completions", json.dumps(body, ensure_ascii=True).encode()


async def run(base: str, model: str, n: int, concurrency: int, hostile_share: float, max_tokens: int,
              ban: list[int]) -> dict:
    rng = random.Random(0)
    semaphore = asyncio.Semaphore(concurrency)
    statuses: collections.Counter = collections.Counter()
    well_formed: collections.Counter = collections.Counter()  # what the well-formed requests got
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    good_latency: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    plan = [rng.random() < hostile_share for _ in range(n)]
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Content-Type": "application/json"}) as client:
        async def one(i: int) -> None:
            hostile = plan[i]
            if hostile:
                kind, path, data = hostile_body(rng, model)
            else:
                kind = "well-formed"
                path = "/v1/completions"
                data = json.dumps({"model": model, "prompt": f"Once upon a time {i}", "max_tokens": max_tokens,
                                   "temperature": 0.8, "seed": i,
                                   "logit_bias": {str(t): -100 for t in ban}}).encode()
            async with semaphore:
                started = time.perf_counter()
                try:
                    r = await client.post(f"{base}{path}", content=data)
                    outcome: Any = r.status_code
                    if not hostile and r.status_code == 200:
                        good_latency.append(time.perf_counter() - started)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                statuses[outcome] += 1
                (well_formed if kind == "well-formed" else by_kind[kind])[outcome] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - started
    good_latency.sort()
    return {"requests": n, "hostile": sum(plan), "wall_s": round(wall, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
            "by_kind": {k: {str(o): n for o, n in c.items()} for k, c in sorted(by_kind.items())},
            "well_formed_outcomes": {str(o): n for o, n in well_formed.items()},
            "5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "well_formed_ok": len(good_latency),
            "well_formed_p50_ms": round(1000 * statistics.median(good_latency), 1) if good_latency else None,
            "well_formed_p95_ms": round(1000 * good_latency[int(0.95 * (len(good_latency) - 1))], 1)
            if good_latency else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hostile-share", type=float, default=0.10)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--preset", default="nano")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, eos = build_model(Path(tmp), args.preset)
        with Server(model_dir, 16, None, extra=["--redact-pii", "content", "--max-queue", "512"]) as server:
            before = rss_mib(server.proc.pid)
            result = asyncio.run(run(server.base, model_dir.name, args.requests, args.concurrency,
                                     args.hostile_share, args.max_tokens, eos))
            after = rss_mib(server.proc.pid)
            healthy = httpx.get(f"{server.base}/health").json()
    report = {"benchmark": "serve_abuse", "date": time.strftime("%Y-%m-%d"),
              "hardware": f"{os.cpu_count()} CPU cores (no GPU)", "loadavg": [round(x, 2) for x in os.getloadavg()],
              "model": args.preset, "concurrency": args.concurrency, **result,
              "rss_mib_before": before, "rss_mib_after": after, "health_after": healthy}
    print(json.dumps(report, indent=2))
    sys.exit(1 if result["5xx"] else 0)


if __name__ == "__main__":
    main()
