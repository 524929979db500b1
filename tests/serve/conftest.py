"""Fixtures: a tiny model + byte-level tokenizer on disk, the real `gptforge serve` CLI in a subprocess,
and in-process uvicorn servers (with a deliberately slowed model) for queueing/cancel/timeout tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptforge.config import Config
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer
from gptforge.loading import load, save

from serve_helpers import API_KEY, CORPUS, MODEL_NAME, InProcessServer, free_port, wait_healthy  # noqa: F401


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama-style model with a byte-level BPE tokenizer, saved with gptforge.loading.save."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train_bpe(CORPUS * 20, vocab_size=320)
    config = Config(name="tiny", family="llama", vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2,
                    n_head=4, n_embd=64, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(config)
    path = tmp_path_factory.mktemp("serve") / MODEL_NAME
    save(path, model, tokenizer)
    return path


@pytest.fixture(scope="session")
def reference_model(model_dir):
    """The same model in-process, for checking the server's numbers."""
    model, tokenizer = load(model_dir)
    return model, tokenizer


class CLIServer:
    def __init__(self, proc: subprocess.Popen, base: str, log_path: Path, db: Path) -> None:
        self.proc, self.base, self.log_path, self.db = proc, base, log_path, db

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`gptforge serve` as a real process on 127.0.0.1 (API key required)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    db = log_path.parent / "feedback.db"  # the chat page's ratings
    env = {**os.environ, "GPTFORGE_API_KEYS": "sk-env-key", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gptforge.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--api-key", API_KEY, "--max-concurrency", "8", "--max-queue", "64", "--max-body-bytes", "65536",
           "--threads", "1", "--redact-pii", "logs", "--graceful-timeout", "20", "--feedback-db", str(db)]
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc=proc)
        yield CLIServer(proc, base, log_path, db)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_file.close()


@pytest.fixture(scope="module")
def start_server(model_dir):
    """Factory: `start_server(options, step_delay=0.0)` -> running InProcessServer (stopped at module end)."""
    from gptforge.serve.app import create_app

    started = []

    def start(options, step_delay: float = 0.0) -> InProcessServer:
        def loader():
            model, tokenizer = load(model_dir)
            if step_delay:
                forward = model.forward

                def slow_forward(*args, **kwargs):  # makes generation long enough to interrupt
                    time.sleep(step_delay)
                    return forward(*args, **kwargs)

                model.forward = slow_forward
            return model, tokenizer

        srv = InProcessServer(create_app(loader, options), free_port()).__enter__()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.__exit__()
