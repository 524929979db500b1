"""Load test of `gptforge serve`: generated tokens/s and time-to-first-token at several concurrencies.

A random-weight model (with a byte-level BPE tokenizer) is saved and served by the real CLI in a
subprocess on 127.0.0.1. Streaming completions with a fixed length (EOS banned through logit_bias) are
fired by an asyncio client at each concurrency. The peer, measured in the same run, is either
- `--peer batching-off` (default): the same server with continuous batching off (`--max-concurrency 1`)
  at the highest concurrency; or
- `--peer llama-server`: llama.cpp's server ($LLAMACPP_BIN/llama-server) on the same weights
  (`gptforge export --format gguf`), one slot per concurrent request, with the same request mix; the two
  servers are measured back to back per level and round (`--repeats`), and figures are medians; or
- `--peer prefix-cache-off`: chats of `--turns` turns (a long system prompt, each reply kept in the
  history), run turn by turn on two servers, with the prefix cache (default) and without
  (`--prefix-cache-mb 0`); the figure is the time to first token of each turn, the last turn's above all; or
- `--peer one-adapter`: one server with `--adapters` LoRA adapters (rank 8 on attention and MLP); at each
  concurrency, requests spread over all the adapters (so every batch mixes them) against the same requests
  all for one adapter, and for the base model alone; or
- `--peer prompt-lookup` (with `--model DIR`, a trained model that copies code, and $LLAMACPP_BIN): one
  code-editing request at a time (benchmarks/prompt_lookup.py's "edit" prompt: a function, then its start
  with a name changed), greedy, on our server with `--prompt-lookup 10` and with it off per request, and on
  llama-server with `--spec-type ngram-simple` (n-gram 2, drafts of 10) and without, same GGUF weights;
  the replies' texts are compared.
Prints one JSON object: our figures per concurrency, the peer's, and their ratios.

    python benchmarks/serve_load.py                         # the full run (about a minute on 2 cores)
    python benchmarks/serve_load.py --preset nano --requests-per-level 8 --max-tokens 16   # a smoke run
    LLAMACPP_BIN=/root/.cache/llamacpp/bin python benchmarks/serve_load.py --peer llama-server \
        --preset llama-small --concurrency 1,16 --repeats 3
    python benchmarks/serve_load.py --peer prefix-cache-off --preset llama-small --conversations 3
    python benchmarks/serve_load.py --peer one-adapter --preset llama-micro --concurrency 8
    LLAMACPP_BIN=/root/.cache/llamacpp/bin python benchmarks/serve_load.py --peer prompt-lookup \
        --model runs/stdlib-code/model --max-tokens 96 --requests-per-level 8
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
from collections.abc import AsyncIterator
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


def llama_server(binaries: Path, gguf: Path, slots: int, context: int, threads: int | None,
                 extra: list[str] = (), log_name: str = "") -> Server:
    """llama.cpp's server on `gguf` with `slots` parallel sequences of `context` tokens each."""
    cmd = [str(binaries / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}",
           "-np", str(slots), "-c", str(context * slots), "--no-webui", *extra]
    if threads:
        cmd += ["-t", str(threads)]
    server = Server(gguf, slots, threads, cmd=cmd, log=gguf.with_suffix(f".{log_name or 'server'}.log"))
    server.name = "llama-server"
    return server


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of a streamed OpenAI-style response (after raising for an error status)."""
    response.raise_for_status()
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def one_request(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float, int]:
    """(time to first token, generated tokens) of one streamed completion.

    Tokens are the usage's completion_tokens, or (a server without streamed usage) the text chunks. A
    keep-alive connection the server closed before answering is retried once on a new one (llama-server's
    HTTP library closes a connection after a few requests, and the pool may hand it out just then)."""
    try:
        return await _one_request(client, base, body)
    except httpx.RemoteProtocolError:
        return await _one_request(client, base, body)


async def _one_request(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float, int]:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    chunks = 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        async for chunk in sse_chunks(response):
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens or chunks


async def run_level(base: str, model: str | list[str], concurrency: int, requests: int, body: dict,
                    prompt: str | list[int] | None = None) -> dict:
    """Fire `requests` completions with at most `concurrency` in flight; tokens/s and TTFT percentiles.

    `model`: one name, or names that the requests take in turn; `prompt`: every request's (default: a
    short text that differs per request)."""
    models = [model] if isinstance(model, str) else model
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def task(i: int):
            async with semaphore:
                return await one_request(client, base, {**body, "model": models[i % len(models)],
                                                        "prompt": prompt or f"{CORPUS[i % 3]} {i}"})

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
    """Ours and llama-server on the same weights and request mix, one after the other in each round."""
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
        # One server runs at a time: an idle server whose compute threads spin (OMP_WAIT_POLICY=ACTIVE, or
        # llama.cpp's polling) would take a core from the other. The order alternates between rounds.
        sides = [(lambda: Server(model_dir, top, args.threads), body, ours),
                 (lambda: llama_server(binaries, gguf, top, context, args.threads), peer_body, theirs)]
        for round_ in range(args.repeats):
            for start, b, results in (sides if round_ % 2 == 0 else sides[::-1]):
                with start() as server:
                    try:
                        asyncio.run(run_level(server.base, name, 2, 2, b))  # warm-up
                        for c in levels:
                            n = max(args.requests_per_level, c)
                            results[c].append(asyncio.run(run_level(server.base, name, c, n, b)))
                    except httpx.HTTPError as exc:
                        tail = server.log.read_bytes()[-1500:].decode(errors="replace") if server.log else ""
                        raise RuntimeError(f"{server.name} failed ({exc!r}); its log ends:\n{tail}") from exc
            for c in levels:
                print(f"round {round_ + 1}/{args.repeats} concurrency {c}: ours {ours[c][-1]['tokens_per_s']} "
                      f"tok/s, llama-server {theirs[c][-1]['tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    levels_out = []
    for c in levels:
        a, b = median_level(ours[c]), median_level(theirs[c])
        levels_out.append({"concurrency": c, "gptforge": a, "llama_server": b,
                           "ratio_tokens_per_s": round(a["tokens_per_s"] / b["tokens_per_s"], 3),
                           "ratio_ttft_p50": round(a["ttft_p50_ms"] / max(b["ttft_p50_ms"], 1e-9), 3)})
    return {"peer": "llama-server", "gguf_type": args.gguf_type, "levels": levels_out}


async def chat_turn(client: httpx.AsyncClient, base: str, body: dict) -> dict:
    """One streamed chat turn: time to the first content token, the reply, and the usage."""
    start = time.perf_counter()
    ttft, text, usage = None, "", {}
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        async for chunk in sse_chunks(response):
            delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if delta:
                ttft = ttft or time.perf_counter() - start
                text += delta
            usage = chunk.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"ttft_s": ttft or time.perf_counter() - start, "reply": text, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": cached}


def compare_prefix_cache(args: argparse.Namespace) -> dict:
    """Multi-turn chats on a server with the prefix cache and one without, turn by turn in the same run."""
    system = "You answer questions about these notes. " + " ".join(CORPUS) * args.system_repeats
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, eos_ids = build_model(Path(tmp), args.preset)
        name = model_dir.name
        base_body = {"model": name, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                     "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in eos_ids}}
        turns: dict[str, list[list[dict]]] = {"cache_on": [], "cache_off": []}

        async def run(servers: dict[str, Server]) -> None:
            async with httpx.AsyncClient(timeout=600) as client:
                for key, server in servers.items():  # warm-up, on a chat unlike the measured ones
                    await chat_turn(client, server.base, {**base_body, "messages": [{"role": "user", "content": "hi"}]})
                for conv in range(args.conversations):
                    histories = {key: [{"role": "system", "content": f"Chat {conv}. {system}"}] for key in servers}
                    for key in servers:
                        turns[key].append([])
                    for turn in range(args.turns):
                        question = f"Question {turn + 1}: {CORPUS[(conv + turn) % len(CORPUS)]}"
                        for key, server in servers.items():  # the same turn on each server, back to back
                            histories[key].append({"role": "user", "content": question})
                            result = await chat_turn(client, server.base, {**base_body, "messages": histories[key]})
                            histories[key].append({"role": "assistant", "content": result["reply"]})
                            turns[key][-1].append(result)
                        print(f"chat {conv + 1} turn {turn + 1}: ttft with cache "
                              f"{turns['cache_on'][-1][-1]['ttft_s'] * 1000:.0f} ms, without "
                              f"{turns['cache_off'][-1][-1]['ttft_s'] * 1000:.0f} ms", file=sys.stderr, flush=True)

        with Server(model_dir, 4, args.threads) as on, \
                Server(model_dir, 4, args.threads, extra=["--prefix-cache-mb", "0"]) as off:
            asyncio.run(run({"cache_on": on, "cache_off": off}))

    def per_turn(key: str) -> list[dict]:
        out = []
        for t in range(args.turns):
            rows = [conv[t] for conv in turns[key]]
            out.append({"turn": t + 1, "ttft_median_ms": round(1000 * statistics.median(r["ttft_s"] for r in rows), 1),
                        "prompt_tokens": rows[0]["prompt_tokens"],
                        "cached_tokens": rows[0]["cached_tokens"]})
        return out

    on, off = per_turn("cache_on"), per_turn("cache_off")
    same = all(a["reply"] == b["reply"] for ca, cb in zip(turns["cache_on"], turns["cache_off"]) for a, b in zip(ca, cb))
    last = args.turns - 1
    return {"peer": "the same server with --prefix-cache-mb 0", "conversations": args.conversations,
            "gptforge_prefix_cache": on, "peer_no_prefix_cache": off, "replies_identical": same,
            f"ttft_turn_{args.turns}_ms": {"cache_on": on[last]["ttft_median_ms"], "cache_off": off[last]["ttft_median_ms"]},
            f"speedup_ttft_turn_{args.turns}": round(off[last]["ttft_median_ms"] / max(on[last]["ttft_median_ms"], 1e-9), 2)}


def compare_adapters(args: argparse.Namespace, levels: list[int]) -> dict:
    """Throughput with requests spread over several LoRA adapters (mixed batches) vs one adapter vs none."""
    import torch

    from gptforge.finetune.lora import LoRAConfig, apply_lora, lora_modules, save_lora
    from gptforge.loading import load

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, eos_ids = build_model(Path(tmp), args.preset)
        flags = []
        for i in range(args.adapters):
            model, _ = load(model_dir)
            apply_lora(model, LoRAConfig(r=8, alpha=16, target_modules=["attn.qkv", "attn.out", "mlp.up", "mlp.down"]))
            with torch.no_grad():
                for m in lora_modules(model).values():
                    m.lora_B.normal_(0, 0.02)
            flags += ["--lora", f"adapter{i}={save_lora(model, Path(tmp) / f'adapter{i}')}"]
        body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {str(i): -100 for i in eos_ids}}
        mixes = {"mixed": [f"adapter{i}" for i in range(args.adapters)], "one_adapter": "adapter0",
                 "base": model_dir.name}
        out: dict[str, list] = {k: [] for k in mixes}
        with Server(model_dir, max(levels), args.threads, extra=flags + ["--prefix-cache-mb", "0"]) as server:
            asyncio.run(run_level(server.base, mixes["mixed"], 2, 2, body))  # warm-up
            for c in levels:
                for key, models in mixes.items():  # back to back per level
                    out[key].append(asyncio.run(run_level(server.base, models, c, max(args.requests_per_level, c),
                                                          body)))
                print(f"concurrency {c}: " + ", ".join(f"{k} {v[-1]['tokens_per_s']} tok/s" for k, v in out.items()),
                      file=sys.stderr, flush=True)
    return {"peer": "the same requests all for one adapter (and for the base model)", "adapters": args.adapters,
            "gptforge_mixed_adapters": out["mixed"], "peer_one_adapter": out["one_adapter"], "base_model": out["base"],
            "ratio_mixed_over_one_adapter": [round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                                             for a, b in zip(out["mixed"], out["one_adapter"])],
            "ratio_one_adapter_over_base": [round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                                            for a, b in zip(out["one_adapter"], out["base"])]}


def compare_prompt_lookup(args: argparse.Namespace) -> dict:
    """Code edits one at a time: ours and llama-server, each with prompt lookup and without, same weights."""
    binaries = Path(os.environ.get("LLAMACPP_BIN", ""))
    if not os.environ.get("LLAMACPP_BIN") or not (binaries / "llama-server").is_file():
        return {"benchmark": "serve_load", "skipped": "--peer prompt-lookup: set LLAMACPP_BIN to a folder with "
                "llama.cpp's llama-server; nothing was measured"}
    if not args.model:
        raise SystemExit("--peer prompt-lookup needs --model DIR: a trained model (a random one never copies)")
    from prompt_lookup import code_prompts  # benchmarks/prompt_lookup.py: the same prompts as the decode figure

    from gptforge.loading import load

    model_dir = Path(args.model)
    model, tokenizer = load(model_dir)
    context = model.config.block_size
    prompt = code_prompts(tokenizer, context - args.max_tokens)["edit"]
    eos = {str(i): -100 for i in tokenizer.stop_token_ids()}
    body = {"max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": eos}
    del model
    results: dict[str, list] = {k: [] for k in ("ours_plain", "ours_lookup", "llama_plain", "llama_lookup")}
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        done = subprocess.run([sys.executable, "-m", "gptforge.cli", "export", "--model", str(model_dir),
                               "--format", "gguf", "--out", str(gguf), "--dtype", args.gguf_type],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"gguf export failed: {done.stderr[-2000:]}")
        spec = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "2", "--spec-ngram-simple-size-m", "10"]
        plain_peer = llama_server(binaries, gguf, 1, context, args.threads)
        lookup_peer = llama_server(binaries, gguf, 1, context, args.threads, extra=spec, log_name="spec")
        ours = Server(model_dir, 1, args.threads, extra=["--prompt-lookup", "10", "--served-model-name", model_dir.name])
        with ours as server, \
                plain_peer as peer, lookup_peer as spec_peer:
            runs = {"ours_plain": (server.base, {**body, "prompt_lookup_num_tokens": 0}),
                    "ours_lookup": (server.base, body),
                    "llama_plain": (peer.base, {**body, "ignore_eos": True}),
                    "llama_lookup": (spec_peer.base, {**body, "ignore_eos": True})}
            for key, (base, b) in runs.items():
                asyncio.run(run_level(base, model_dir.name, 1, 1, b, prompt))  # warm-up
                reply = httpx.post(f"{base}/v1/completions", timeout=600,
                                   json={**b, "stream": False, "model": model_dir.name, "prompt": prompt})
                reply.raise_for_status()
                texts[key] = reply.json()["choices"][0]["text"]
            for round_ in range(args.repeats):
                for key, (base, b) in runs.items():  # alternately, so that all four see the same load
                    results[key].append(asyncio.run(run_level(base, model_dir.name, 1, args.requests_per_level,
                                                              b, prompt)))
                print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
                    f"{k} {v[-1]['tokens_per_s']} tok/s" for k, v in results.items()), file=sys.stderr, flush=True)
    med = {k: median_level(v) for k, v in results.items()}
    tps = {k: v["tokens_per_s"] for k, v in med.items()}
    return {"peer": "llama-server --spec-type ngram-simple", "gguf_type": args.gguf_type, "model_dir": str(model_dir),
            "prompt_tokens": len(prompt), **med,
            "speedup_ours": round(tps["ours_lookup"] / tps["ours_plain"], 3),
            "speedup_llama_server": round(tps["llama_lookup"] / tps["llama_plain"], 3),
            "ratio_lookup_ours_over_llama_server": round(tps["ours_lookup"] / tps["llama_lookup"], 3),
            "ratio_plain_ours_over_llama_server": round(tps["ours_plain"] / tps["llama_plain"], 3),
            "same_text": {"ours_lookup_vs_plain": texts["ours_lookup"] == texts["ours_plain"],
                          "llama_lookup_vs_plain": texts["llama_lookup"] == texts["llama_plain"],
                          "ours_vs_llama_server": texts["ours_plain"] == texts["llama_plain"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro", help="gptforge config preset (default: micro, 1.3M params)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server(s) (default: each server's own default)")
    parser.add_argument("--peer", choices=["batching-off", "llama-server", "prefix-cache-off", "one-adapter",
                                           "prompt-lookup"],
                        default="batching-off",
                        help="what to compare with (see the module docstring)")
    parser.add_argument("--gguf-type", default="f32", help="llama-server's weights: f32 | f16 | bf16 | q8_0 | q4_0")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per level with --peer llama-server (medians)")
    parser.add_argument("--model", default=None, help="a trained model folder, for --peer prompt-lookup")
    parser.add_argument("--adapters", type=int, default=4, help="LoRA adapters with --peer one-adapter")
    parser.add_argument("--conversations", type=int, default=3, help="chats with --peer prefix-cache-off (medians)")
    parser.add_argument("--turns", type=int, default=5, help="turns per chat with --peer prefix-cache-off")
    parser.add_argument("--system-repeats", type=int, default=3,
                        help="how many times the notes are repeated in the system prompt (its length)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    header = {"benchmark": "serve_load", "date": time.strftime("%Y-%m-%d"),
              "hardware": f"{os.cpu_count()} CPU cores (no GPU)", "loadavg_before": [round(x, 2) for x in os.getloadavg()],
              "model": {"preset": args.preset, "max_tokens": args.max_tokens},
              "server_threads": args.threads or "default"}
    if args.peer != "batching-off":
        compare = {"llama-server": lambda: compare_llama_server(args, levels),
                   "prefix-cache-off": lambda: compare_prefix_cache(args),
                   "one-adapter": lambda: compare_adapters(args, levels),
                   "prompt-lookup": lambda: compare_prompt_lookup(args)}[args.peer]()
        report = {**header, **compare}
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
