"""What the serving tests share (a module of its own: test files import it, never `conftest`, whose
name several test folders use)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx

API_KEY = "sk-test-0123456789"
MODEL_NAME = "tiny-chat"
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Hello world! {\"name\": \"fox\", \"age\": 3, \"tags\": [\"a\", \"b\"]} ",
    "Once upon a time there was a tiny model that served requests over HTTP. ",
    "0123456789 + - * / = ( ) [ ] { } : , . ; ' \" ",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {base} not healthy after {timeout}s")


class InProcessServer:
    """uvicorn in a thread around `create_app` (lets a test slow the model or read the logs)."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.app = app
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        wait_healthy(self.base)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
