"""Training metrics: a JSONL log, a loss-curve PNG, a progress display, and optional TensorBoard / W&B mirrors.

Only rank 0 writes. The JSONL is the source of truth; the PNG and the other sinks are views of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

# Dense peak throughput of common accelerators (bf16, no sparsity), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12,
                  "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def estimate_peak_flops(device: Any, threads: Optional[int] = None) -> float:
    """Rough peak FLOP/s of `device`: a table for GPUs; cores x 2.5 GHz x SIMD FMA width for CPUs."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 100e12
    threads = threads or torch.get_num_threads()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    # fp32 FMAs per cycle per core: 2 units x 16 lanes (AVX-512) or x 8 lanes (AVX2), 2 FLOPs each.
    per_cycle = 64 if "avx512f" in flags else 32
    return threads * 2.5e9 * per_cycle


class MetricsLogger:
    """Append-only metrics JSONL plus optional TensorBoard / W&B mirrors."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                log.warning("train.tensorboard=true but tensorboard is not installed; skipping it")
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config or {})
            except ImportError:
                log.warning("train.wandb_project is set but wandb is not installed; skipping it")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run recomputes them, so the log has each step once)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _record_step(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must contain `step`)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            if self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a kill is dropped


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL (a torn last line is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def import_plotting() -> None:
    """Import matplotlib (Agg) now: its first import takes a second or more, which a timed run pays up front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> Optional[Path]:
    """Draw train loss (and eval metrics ending in `loss`) against tokens or steps into a PNG."""
    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.endswith("_loss") for k in r)]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="train loss")
    keys = sorted({k for r in evals for k in r if k.endswith("_loss")})
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png_path)


def save_figure(fig: Any, png_path: str | Path) -> Path:
    """Lay out `fig`, write it as a PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png_path


class ProgressBar:
    """Training progress on rank 0 (`gptforge.progress.Progress`): over optimizer steps, or over the seconds
    of a time budget (`unit="s"`), with loss, tokens/s, lr and MFU; the ETA comes with it."""

    def __init__(self, total: int, initial: int, enabled: bool, flops_per_token: float, peak_flops: float,
                 is_main: bool = True, unit: str = "step") -> None:
        from ..progress import Progress

        self.is_main = is_main  # other ranks stay quiet
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.unit = unit
        self.display = Progress(total, desc="train", unit=unit, initial=initial, enabled=enabled and is_main,
                                show_rate=unit != "s")

    def update(self, loss: float, tokens_per_s: float, lr: float, position: Optional[float] = None,
               step: Optional[int] = None) -> Optional[float]:
        """Show one more step (or move to `position` seconds of a time budget); returns the MFU."""
        mfu = self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None
        if self.display.enabled:
            postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}", "lr": f"{lr:.2e}"}
            if step is not None and self.unit != "step":
                postfix = {"step": f"{step:,}", **postfix}
            if mfu is not None:
                postfix["mfu"] = f"{100 * mfu:.1f}%"
            self.display.set_postfix(postfix)
            if position is None:
                self.display.update(1)
            else:
                self.display.set_position(position)
        return mfu

    def write(self, text: str) -> None:
        """A message line beside the bar (the log when the bar is off)."""
        if self.display.enabled:
            self.display.write(text)
        elif self.is_main:
            log.info(text)

    def close(self, position: Optional[float] = None) -> None:
        """Finish the display, at `position` for a time-budget bar."""
        if position is not None and self.display.enabled:
            self.display.set_position(position)
        self.display.close()


__all__ = ["MetricsLogger", "ProgressBar", "plot_loss_curve", "save_figure", "import_plotting", "read_metrics", "estimate_peak_flops"]
