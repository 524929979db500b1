"""The training loop: learning, accumulation, early stopping, checkpoints, exact resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.checkpoint import CheckpointError
from gptforge.config import Config
from gptforge.model import GPT
from gptforge.train import checkpointing as checkpointing_module
from gptforge.train.loop import TrainConfig, latest_checkpoint, train
from gptforge.train.metrics import read_metrics
from gptforge.loading import load_model

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from tiny_run import RandomSource  # noqa: E402


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name("nano", vocab_size=32, block_size=16, **overrides))


def losses_of(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def quick_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 6, "lr": 3e-3, "progress": False, **kw})


def test_training_lowers_loss_and_writes_run_folder(tmp_path):
    result = train(tiny_model(), quick_cfg(max_steps=25), RandomSource(), tmp_path / "run")
    assert result.steps == 25 and not result.interrupted
    assert result.losses[-1] < result.losses[0] - 1.0
    run = tmp_path / "run"
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert len(losses_of(run)) == 25
    reloaded = load_model(run / "model")
    x = torch.arange(16)[None]
    model_logits = reloaded(x)
    assert model_logits.shape == (1, 16, 32)
    assert latest_checkpoint(run).name == "step-00000025"


def test_only_trainable_parameters_change(tmp_path):
    model = tiny_model()
    model.wte.weight.requires_grad_(False)
    frozen = model.wte.weight.detach().clone()
    before = model.blocks[0].mlp.up.weight.detach().clone()
    train(model, quick_cfg(max_steps=3), RandomSource(), tmp_path / "run")
    assert torch.equal(model.wte.weight.detach(), frozen)
    assert not torch.equal(model.blocks[0].mlp.up.weight.detach(), before)


def test_accumulation_matches_a_bigger_batch(tmp_path):
    class Doubled(RandomSource):
        def next_batch(self):
            a, b = super().next_batch(), super().next_batch()
            return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])

    big = train(tiny_model(), quick_cfg(grad_clip=0.5), Doubled(), tmp_path / "big")
    acc = train(tiny_model(), quick_cfg(grad_clip=0.5, grad_accum_steps=2), RandomSource(), tmp_path / "acc")
    assert acc.losses == pytest.approx(big.losses, rel=1e-5)


def test_batch_tokens_sets_accumulation_and_masked_labels_are_ignored(tmp_path):
    class Masked(RandomSource):
        def next_batch(self):
            x, y = super().next_batch()
            y = y.clone()
            y[:, :8] = -100
            return x, y

    result = train(tiny_model(), quick_cfg(max_steps=2, batch_tokens=128), Masked(), tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["tokens"] for r in records] == [128, 256]  # 2 micro-batches of 4 x 16 per step
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_early_stopping_keeps_best_and_last(tmp_path):
    scores = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9])
    result = train(tiny_model(), quick_cfg(max_steps=50, eval_every=2, early_stopping_patience=2), RandomSource(),
                   tmp_path / "run", evaluate=lambda m: {"val_loss": next(scores)})
    # Evaluations at steps 0, 2, 4, 6: best 4.0 at step 2, then two without improvement.
    assert result.stopped_early and result.steps == 6
    assert result.best_metric == 4.0 and result.best_step == 2
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path / "run").name == "step-00000006"


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    train(tiny_model(), quick_cfg(max_steps=1), RandomSource(), tmp_path / "run")
    with pytest.raises(ValueError, match="resume"):
        train(tiny_model(), quick_cfg(max_steps=1), RandomSource(), tmp_path / "run")


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="train.schedule"):
        train(tiny_model(), quick_cfg(schedule="triangle"), RandomSource(), tmp_path / "a")
    with pytest.raises(ValueError, match="train.max_steps"):
        train(tiny_model(), quick_cfg(max_steps=0), RandomSource(), tmp_path / "b")


def test_failed_checkpoint_write_keeps_the_previous_latest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_model(), quick_cfg(max_steps=2, checkpoint_every=2), RandomSource(), run)
    assert latest_checkpoint(run).name == "step-00000002"

    calls = {"n": 0}
    real_save_state = checkpointing_module.save_state

    def crash_midway(state, directory, name):
        calls["n"] += 1
        if name == "ranks":  # model and optimizer are already in the temp folder
            raise OSError("disk full (simulated)")
        return real_save_state(state, directory, name)

    monkeypatch.setattr(checkpointing_module, "save_state", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        train(tiny_model(), quick_cfg(max_steps=4, checkpoint_every=2), RandomSource(), run, resume=True)
    assert latest_checkpoint(run).name == "step-00000002"
    assert not list((run / "checkpoints").glob(".step-*"))  # the half-written folder is gone
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]


def test_corrupt_latest_pointer_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    train(tiny_model(), quick_cfg(max_steps=1), RandomSource(), run)
    (run / "checkpoints" / "latest").write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="step-00000099"):
        train(tiny_model(), quick_cfg(max_steps=2), RandomSource(), run, resume=True)


def _tiny_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "tiny_run.py"), str(out), *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    full = _tiny_run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    # Killed while fetching batch 8 (step 9): checkpoints exist for steps 3 and 6 only.
    killed = _tiny_run(tmp_path / "resumed", "--kill-at", "8")
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000006"
    assert max(losses_of(tmp_path / "resumed")) == 8
    resumed = _tiny_run(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = losses_of(tmp_path / "full"), losses_of(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 13))
    assert got == expected  # bit-for-bit: model, optimizer, schedule, RNG (dropout) and data position
    evals = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resumes(tmp_path):
    stopped = _tiny_run(tmp_path / "run", "--sigint-at", "4")
    assert stopped.returncode == 130, stopped.stderr
    assert json.loads(stopped.stdout.strip().splitlines()[-1]) == {"steps": 5, "interrupted": True}
    assert latest_checkpoint(tmp_path / "run").name == "step-00000005"
    assert load_model(tmp_path / "run" / "model").config.vocab_size == 32
    resumed = _tiny_run(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    full = _tiny_run(tmp_path / "full")
    assert full.returncode == 0, full.stderr
    assert losses_of(tmp_path / "run") == losses_of(tmp_path / "full")
