"""Learning-rate schedules and AdamW parameter groups."""

import math

import pytest

from gptforge.config import Config
from gptforge.model import GPT
from gptforge.train.optim import build_optimizer, parameter_groups
from gptforge.train.schedule import LRSchedule


def test_warmup_then_cosine_to_min():
    s = LRSchedule(1.0, max_steps=101, warmup_steps=10, kind="cosine", min_lr_ratio=0.1)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(100) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_stable_decay():
    s = LRSchedule(2.0, max_steps=101, warmup_steps=5, kind="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert [s.lr_at(i) for i in (5, 40, 80)] == [2.0, 2.0, 2.0]
    assert s.lr_at(90) == pytest.approx(2.0 * (1 - math.sqrt(0.5)))
    assert s.lr_at(100) == pytest.approx(0.0)
    # A time-based fraction moves the decay: halfway through it whatever the step.
    assert s.lr_at(20, fraction=0.9) == pytest.approx(2.0 * (1 - math.sqrt(0.5)))


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="train.schedule"):
        LRSchedule(1.0, 10, kind="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRSchedule(1.0, 10, min_lr_ratio=2.0)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = GPT(Config.from_name("nano", vocab_size=64, block_size=16))
    decay, no_decay = parameter_groups(model, 0.1)  # (decayed group, plain group)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "wte.weight" in plain and "wpe.weight" in plain  # tied lm_head is the same tensor, counted once
    assert any(n.endswith("norm1.weight") for n in plain) and any(n.endswith("qkv.bias") for n in plain)
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.down.weight" in decayed
    total = sum(p.numel() for p in decay["params"] + no_decay["params"])
    assert total == model.num_params()


def test_untied_head_is_decayed_and_frozen_parameters_are_left_out():
    model = GPT(Config.from_name("llama-nano", vocab_size=64, block_size=16))
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(model.lm_head.weight) in decayed and id(model.wte.weight) not in decayed
    everything = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.blocks[0].attn.qkv.weight) not in everything
    assert optimizer.defaults.get("fused") is True  # CPU fused AdamW (torch >= 2.4)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    import torch

    from gptforge.train.optim import MuonWithAdamW, hidden_matrices

    for tie in (True, False):
        model = GPT(Config.from_name("llama-nano", vocab_size=64, block_size=16, tie_embeddings=tie))
        optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, kind="muon", muon_lr=0.02)
        assert isinstance(optimizer, MuonWithAdamW)
        names = {id(p): n for n, p in model.named_parameters()}
        muon = {names[id(p)] for p in optimizer.muon.param_groups[0]["params"]}
        adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
        assert muon == {names[id(p)] for p in hidden_matrices(model)}
        assert muon == {n for n in names.values() if n.startswith("blocks.") and n.endswith("weight")
                        and "norm" not in n}
        assert "wte.weight" in adamw and ("lm_head.weight" in adamw) is not tie
        assert not muon & adamw and len(muon | adamw) == len(names)
        # One schedule drives both: the Muon group's lr is muon_lr when the base lr is lr.
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * group.get("lr_scale", 1.0)
        assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02)
        assert {g["lr"] for g in optimizer.adamw.param_groups} == {1e-3}
    with pytest.raises(ValueError, match="train.optimizer must be one of"):
        build_optimizer(model, lr=1e-3, kind="sgd")
    with pytest.raises(ValueError, match="a Muon\\+AdamW state has 'muon' and 'adamw'"):
        optimizer.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_training_with_muon_learns_and_resumes_exactly(tmp_path):
    import sys
    from pathlib import Path

    import torch

    from gptforge.train.loop import TrainConfig, train
    from gptforge.train.metrics import read_metrics

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_run import RandomSource

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = GPT(Config.from_name("llama-nano", vocab_size=32, block_size=16))
        # A constant schedule: stopping at step 5 of 5 is then the same as passing step 5 of 10.
        cfg = TrainConfig(max_steps=steps, lr=3e-3, optimizer="muon", muon_lr=0.02, warmup_steps=2,
                          schedule="constant", checkpoint_every=5, progress=False, seed=3)
        return train(model, cfg, RandomSource(), out, resume=resume)

    full = run(tmp_path / "full", 10)
    assert full.losses[-1] < full.losses[0] - 1.0
    run(tmp_path / "split", 5)
    run(tmp_path / "split", 10, resume=True)
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r}
              for name in ("full", "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 10  # Muon momentum and AdamW moments both restored
    with pytest.raises(Exception, match="train.optimizer"):
        TrainConfig(optimizer="lion").validate()


def test_muon_update_is_torch_muons_in_float32():
    import torch

    from gptforge.train.optim import Muon, orthogonalize

    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (16, 48), (48, 16)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    before = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, before):
        du, dt = (p - p0).detach().flatten(), (q - p0).detach().flatten()
        # torch iterates in bfloat16: the same direction and size up to its rounding.
        assert torch.nn.functional.cosine_similarity(du, dt, dim=0) > 0.99
        assert du.norm() == pytest.approx(dt.norm(), rel=0.05)
    # Orthogonalized: singular values near 1 (the quintic iteration leaves them in about [0.5, 1.5]).
    s = torch.linalg.svdvals(orthogonalize(torch.randn(3, 48, 16)))
    assert s.min() > 0.4 and s.max() < 1.6
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
