"""A tiny training run for subprocess tests: `python tiny_run.py OUT_DIR [--resume] [--kill-at N] [--sigint-at N]`.

The batch source kills its own process (SIGKILL, or SIGINT) when asked for batch N, so the tests can
interrupt a run at a known point without racing against it.
"""

import argparse
import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)

from gptforge.config import Config  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.train.loop import TrainConfig, train  # noqa: E402


class RandomSource:
    """Deterministic pseudo-random token batches; state = batch counter."""

    def __init__(self, kill_at: int = -1, sig: int = signal.SIGKILL) -> None:
        self.k, self.kill_at, self.sig = 0, kill_at, sig

    def next_batch(self):
        if self.k == self.kill_at:
            os.kill(os.getpid(), self.sig)
        g = torch.Generator().manual_seed(1000 + self.k)
        self.k += 1
        # Learnable structure: token t+1 = token t + 1 (mod 32), so the loss falls quickly.
        start = torch.randint(0, 32, (4, 1), generator=g)
        rows = (start + torch.arange(17)) % 32
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at", type=int, default=-1)
    ap.add_argument("--sigint-at", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = Config.from_name("nano", vocab_size=32, block_size=16, dropout=0.1)
    model = GPT(config)
    if args.sigint_at >= 0:
        source = RandomSource(args.sigint_at, signal.SIGINT)
    else:
        source = RandomSource(args.kill_at)
    cfg = TrainConfig(max_steps=args.steps, lr=3e-3, warmup_steps=2, checkpoint_every=3, eval_every=4,
                      progress=False, seed=7)
    evaluate = lambda m: {"val_loss": float(m(torch.arange(16)[None] % 32).float().mean())}  # noqa: E731
    result = train(model, cfg, source, args.out, evaluate=evaluate, resume=args.resume)
    print(json.dumps({"steps": result.steps, "interrupted": result.interrupted}))
    sys.exit(130 if result.interrupted else 0)


if __name__ == "__main__":
    main()
