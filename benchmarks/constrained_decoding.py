"""Per-token cost of constrained decoding (structured outputs) on a 50k byte-level BPE vocabulary.

1. Engines (the choice of grammar library): for one JSON schema and one JSON document tokenized by a
   GPT-2-size vocabulary (50,257 tokens, trained here with `Tokenizer.train_bpe` on tinyshakespeare and the
   Python standard library's sources), the time to compile the schema and the time per token to compute the
   next-token mask and advance, for llguidance, xgrammar and outlines-core (those installed).
2. Overhead in gptforge's engine: decode time per token of a small model (4 layers, 256 wide, the 50k
   vocabulary) unconstrained vs under a JSON schema and under JSON mode, batch 1 and 8, same run.
3. Peer: llama.cpp's `llama-completion` (folder in $LLAMACPP_BIN) on the same weights exported to GGUF,
   its sampling time per token with and without `--json-schema` (skipped with a note when absent).

Prints one JSON object. A few minutes on 2 cores:

    python benchmarks/constrained_decoding.py
    python benchmarks/constrained_decoding.py --tokens 16 --skip-engines   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "role", "active", "tags", "address"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
                         "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "address": {"type": "object", "additionalProperties": False,
                                     "required": ["street", "city", "zip"],
                                     "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                    "zip": {"type": "string"}}}}}
DOCUMENT = {"name": "Ada Lovelace of the Analytical Engine", "age": 36, "email": "ada@example.org", "role": "admin",
            "active": True, "tags": ["math", "poetry", "engines", "notes on the engine"],
            "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}}
# What the decode runs generate: a random model fills the strings until the budget closes the object.
DECODE_SCHEMA = {"type": "object", "required": ["notes"], "additionalProperties": False,
                 "properties": {"notes": {"type": "array", "items": {"type": "string"}}}}


def corpus(limit_chars: int = 24_000_000) -> Iterator[str]:
    """tinyshakespeare (when present) and the standard library's Python sources: enough text for 50k merges."""
    shakespeare = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
    if shakespeare.is_file():
        yield shakespeare.read_text(encoding="utf-8")
    seen = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        seen += len(text)
        yield text
        if seen > limit_chars:
            return


def tokenizer_50k(work: Path):
    from gptforge.tokenizer import Tokenizer

    folder = work / "tokenizer-50k"
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(folder)
    tok = Tokenizer.train_bpe(corpus(), vocab_size=50257)
    tok.save(folder)
    return tok


def summary(compile_s: float, per_token: list[float]) -> dict[str, float]:
    ordered = sorted(per_token)
    return {"compile_ms": round(compile_s * 1e3, 2), "mean_us": round(statistics.mean(ordered) * 1e6, 1),
            "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1), "p99_us": round(ordered[int(len(ordered) * .99)] * 1e6, 1)}


def bench_llguidance(tok, ids: list[int], repeats: int) -> dict[str, Any]:
    """llguidance alone (bitmask + consume, like the other engines), then gptforge's constraint around it
    (what the engine calls per token: the mask as a (V,) logit bias, plus the advance)."""
    import llguidance
    import numpy as np

    from gptforge.serve.grammar import JSON_OPTIONS, GrammarEngine, GrammarSpec

    started = time.perf_counter()
    engine = GrammarEngine(tok, tok.vocab_size, tok.stop_token_ids())
    setup = time.perf_counter() - started
    raw: dict[str, Any] = {"vocabulary_setup_ms": round(setup * 1e3, 1)}
    ours: dict[str, Any] = {}
    words = np.empty((tok.vocab_size + 31) // 32, dtype=np.int32)
    for name, schema in (("json_schema", SCHEMA), ("json_object", {"type": "object"})):
        times, compile_s = [], 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            matcher = llguidance.LLMatcher(engine.ll_tokenizer, llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults=JSON_OPTIONS))
            compile_s = time.perf_counter() - started
            for t in ids:
                started = time.perf_counter()
                matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
                assert matcher.consume_token(t)
                times.append(time.perf_counter() - started)
        raw[name] = summary(compile_s, times)
        spec = GrammarSpec.json_schema(schema, "bench")
        times = []
        for _ in range(repeats):
            engine._compiled.clear()  # time the compile itself, not the cache
            started = time.perf_counter()
            constraint = engine.constraint(engine.compile(spec))
            compile_s = time.perf_counter() - started
            for t in ids:
                started = time.perf_counter()
                bias = constraint.allowed(10_000)
                constraint.advance(t)
                times.append(time.perf_counter() - started)
                assert bias[t] == 0, "the document must be allowed"
            assert constraint.complete
        ours[name] = summary(compile_s, times)
    return {"llguidance": raw, "gptforge constraint (llguidance + logit bias)": ours}


def bench_xgrammar(tok, ids: list[int], repeats: int) -> Optional[dict[str, Any]]:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    table = [b if b is not None else b"" for b in tok.token_bytes()]
    info = xgr.TokenizerInfo(table, xgr.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=tok.stop_token_ids())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out: dict[str, Any] = {}
    for name in ("json_schema", "json_object"):
        times, compile_s = [], 0.0
        for r in range(repeats):
            started = time.perf_counter()
            compiled = compiler.compile_json_schema(SCHEMA, any_whitespace=False, separators=(",", ":")) \
                if name == "json_schema" else compiler.compile_builtin_json_grammar()
            compile_s = time.perf_counter() - started
            matcher = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
            for t in ids:
                started = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                assert matcher.accept_token(t)
                times.append(time.perf_counter() - started)
        out[name] = summary(compile_s, times)
    return out


def bench_outlines(tok, ids: list[int]) -> Optional[dict[str, Any]]:
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    eos = tok.eos_token_id
    vocab_map: dict[bytes, list[int]] = {}
    for i, b in enumerate(tok.token_bytes()):
        if b is not None and i not in tok.special_ids:
            vocab_map.setdefault(b, []).append(i)
    vocabulary = outlines_core.Vocabulary(eos, vocab_map)
    started = time.perf_counter()
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""), vocabulary)
    compile_s = time.perf_counter() - started
    guide = outlines_core.Guide(index)
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        started = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
        guide.advance(t, return_tokens=False)
        times.append(time.perf_counter() - started)
    return {"json_schema": summary(compile_s, times), "json_object": "not expressible (no recursion in a regex)"}


# ---- decoding in gptforge's engine ------------------------------------------------------------

class TimedConstraint:
    """Wraps a constraint and adds the time spent in it to a shared counter: the constraint's own cost per
    token, measured inside the engine (robust to a loaded machine, unlike a difference of two wall times)."""

    def __init__(self, inner, spent: list[float]) -> None:
        self.inner, self.spent = inner, spent

    def allowed(self, budget: int):
        started = time.perf_counter()
        try:
            return self.inner.allowed(budget)
        finally:
            self.spent[0] += time.perf_counter() - started

    def advance(self, token: int) -> None:
        started = time.perf_counter()
        self.inner.advance(token)
        self.spent[0] += time.perf_counter() - started

    @property
    def complete(self) -> bool:
        return self.inner.complete


def engine_run(engine, grammars, prompt: list[int], batch: int, tokens: int, mode: str,
               spent: Optional[list[float]] = None) -> tuple[float, int]:
    """(seconds, generated tokens) for `batch` sequences of up to `tokens` each, all submitted at once."""
    from gptforge.sampling import SamplingParams
    from gptforge.serve.engine import SequenceRequest
    from gptforge.serve.grammar import GrammarSpec

    spec = {"free": None, "json_schema": GrammarSpec.json_schema(DECODE_SCHEMA, "bench"),
            "json_object": GrammarSpec.json_object()}[mode]
    compiled = grammars.compile(spec) if spec is not None else None
    requests = [SequenceRequest(index=i, prompt_ids=prompt, max_tokens=tokens, stop_token_ids=(),
                                params=SamplingParams(max_new_tokens=tokens, do_sample=True, temperature=1.0, seed=i),
                                constraint=TimedConstraint(grammars.constraint(compiled), spent if spent is not None else [0.0])
                                if compiled is not None else None)
                for i in range(batch)]
    done = threading.Event()
    count = [0, 0]  # generated tokens, finished sequences

    def sink(events) -> None:
        for ev in events:
            count[0] += ev.token_id is not None
            if ev.finish_reason is not None or ev.error is not None:
                count[1] += 1
        if count[1] == batch:
            done.set()

    started = time.perf_counter()
    engine.submit(requests, sink)
    done.wait(600)
    return time.perf_counter() - started, count[0]


def bench_engine(tok, tokens: int, repeats: int, model) -> dict[str, Any]:
    from gptforge.serve.engine import Engine
    from gptforge.serve.grammar import GrammarEngine

    engine = Engine(model, tok, max_batch=8)
    grammars = GrammarEngine(tok, tok.vocab_size, tok.stop_token_ids())
    prompt = tok.encode("Write the record as JSON:")
    out: dict[str, Any] = {}
    try:
        for batch in (1, 8):
            row: dict[str, Any] = {}
            for mode in ("free", "json_schema", "json_object"):
                engine_run(engine, grammars, prompt, batch, 4, mode)  # warm-up
            runs: dict[str, list[tuple[float, int, float]]] = {m: [] for m in ("free", "json_schema", "json_object")}
            for _ in range(repeats):  # interleaved, so a burst of load from elsewhere hits every mode alike
                for mode in runs:
                    spent = [0.0]
                    seconds, count = engine_run(engine, grammars, prompt, batch, tokens, mode, spent)
                    runs[mode].append((seconds / count * batch, count, spent[0] / count))
            for mode, results in runs.items():
                ms = statistics.median(r[0] for r in results) * 1e3
                row[mode] = {"ms_per_token": round(ms, 3), "tokens": results[0][1]}
                if mode != "free":
                    row[mode]["constraint_us_per_token"] = round(statistics.median(r[2] for r in results) * 1e6, 1)
                    row[mode]["ratio_to_free"] = round(ms / row["free"]["ms_per_token"], 3)
            out[f"batch_{batch}"] = row
    finally:
        engine.shutdown()
    return out


# ---- the peer ---------------------------------------------------------------------------------

def llama_cpp_run(binary: Path, gguf: Path, tokens: int, schema: Optional[dict]) -> Optional[dict[str, float]]:
    cmd = [str(binary), "-m", str(gguf), "-p", "Write the record as JSON:", "-n", str(tokens), "--temp", "1.0",
           "-t", "1", "--perf", "-no-cnv", "--seed", "1"]
    if schema is not None:
        cmd += ["-j", json.dumps(schema)]
    else:
        cmd += ["--ignore-eos"]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600, stdin=subprocess.DEVNULL)
    log = proc.stdout + proc.stderr
    sampling = re.search(r"sampling time =\s+([\d.]+) ms", log)
    evals = re.search(r"eval time =\s+([\d.]+) ms /\s+(\d+) runs", log.split("prompt eval time")[-1])
    if proc.returncode != 0 or not sampling or not evals:
        return None
    runs = int(evals.group(2)) + 1  # the first sampled token follows the prompt's evaluation
    return {"sampling_ms_per_token": round(float(sampling.group(1)) / runs, 3),
            "eval_ms_per_token": round(float(evals.group(1)) / max(1, runs - 1), 3), "tokens": runs}


def bench_llama_cpp(tok, model, tokens: int, work: Path) -> dict[str, Any]:
    folder = os.environ.get("LLAMACPP_BIN", "/root/.cache/llamacpp/bin")
    binary = Path(folder) / "llama-completion"
    if not binary.is_file():
        return {"skipped": f"no llama-completion in {folder} (set LLAMACPP_BIN)"}
    from gptforge.interop.gguf import export_gguf

    gguf = export_gguf(model, work / "constrained-bench.gguf", tok)
    free = llama_cpp_run(binary, gguf, tokens, None)
    constrained = llama_cpp_run(binary, gguf, tokens, DECODE_SCHEMA)
    if free is None or constrained is None:
        return {"skipped": "llama-completion did not report its timings"}
    return {"free": free, "json_schema": constrained,
            "overhead_us_per_token": round((constrained["sampling_ms_per_token"] - free["sampling_ms_per_token"]) * 1e3, 1),
            "note": "llama.cpp's grammar allows whitespace, so its outputs close sooner; compare per-token costs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence in the decode runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's default on 2 cores)")
    parser.add_argument("--work", default=None, help="folder to keep the trained tokenizer in (default: a temp dir)")
    parser.add_argument("--skip-engines", action="store_true", help="only gptforge (no xgrammar / outlines-core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok = tokenizer_50k(work)
        ids = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")))
        engines: dict[str, Any] = bench_llguidance(tok, ids, args.repeats)
        if not args.skip_engines:
            engines["xgrammar"] = bench_xgrammar(tok, ids, args.repeats) or "not installed"
            engines["outlines-core"] = bench_outlines(tok, ids) or "not installed"
        from gptforge.config import Config
        from gptforge.generate import prepare_for_decoding
        from gptforge.model import GPT

        torch.manual_seed(0)
        config = Config(name="bench", family="llama", vocab_size=tok.vocab_size, block_size=512, n_layer=4, n_head=4,
                        n_embd=256, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
        model = GPT(config).eval()
        peer = bench_llama_cpp(tok, model, args.tokens, work)
        ours = bench_engine(tok, args.tokens, args.repeats, prepare_for_decoding(model))
    result = {"vocab_size": tok.vocab_size, "document_tokens": len(ids), "engines": engines, "gptforge_engine": ours,
              "llama_cpp": peer, "threads": args.threads, "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if "overhead_us_per_token" in peer:
        ours_b1 = ours["batch_1"]["json_schema"]["constraint_us_per_token"]
        result["json_schema_overhead_us_per_token"] = {"gptforge": ours_b1, "llama.cpp": peer["overhead_us_per_token"],
                                                       "ratio_llama_cpp_over_gptforge": round(
                                                           peer["overhead_us_per_token"] / max(ours_b1, 1e-3), 2)}
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
