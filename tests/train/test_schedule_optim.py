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
