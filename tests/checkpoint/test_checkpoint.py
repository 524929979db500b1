"""Checkpoints: safetensors only, atomic writes, clear errors for missing/truncated/mismatched files."""

import json
import os

import numpy as np
import pytest
import torch

from gptforge import GPT, Config
from gptforge.atomic import atomic_directory, atomic_path, atomic_write_text
from gptforge.checkpoint import (CheckpointError, capture_rng_state, load_state, load_tensors, restore_rng_state,
                                 save_state, save_tensors)
from gptforge.loading import load_model, save


def tiny() -> GPT:
    return GPT(Config(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_save_load_pretrained_round_trip(tmp_path):
    model = tiny().eval()
    save(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    again = load_model(tmp_path)
    ids = torch.randint(0, 40, (2, 9))
    assert torch.equal(model(ids), again(ids))
    assert again.lm_head.weight is again.wte.weight  # tie survives loading


def test_missing_truncated_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    save(tmp_path / "m", tiny())
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "m")
    weights.write_bytes(data)
    original = json.loads((tmp_path / "m" / "config.json").read_text())
    # Checked against the safetensors headers before anything is allocated: a wider config...
    cfg = json.loads(json.dumps(original))
    cfg["gptforge"]["n_embd"] = 32
    cfg["n_embd"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="parameters but the weights hold"):
        load_model(tmp_path / "m")
    # ...a deeper one (a hostile n_layer must not build layers for minutes)...
    cfg = json.loads(json.dumps(original))
    cfg["gptforge"]["n_layer"] = cfg["n_layer"] = 100_000
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"no tensors for layer {original['n_layer']}"):
        load_model(tmp_path / "m")
    # ...and a missing tensor, named.
    (tmp_path / "m" / "config.json").write_text(json.dumps(original))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    del tensors["transformer.h.0.mlp.c_fc.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="'transformer.h.0.mlp.c_fc.weight' is missing"):
        load_model(tmp_path / "m")


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                      "vocab_size": 10, "n_positions": 8, "n_embd": 8,
                                                      "n_layer": 1, "n_head": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads(tmp_path):
    model = tiny()
    save(tmp_path, model)
    tensors = load_tensors(tmp_path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_tensors({k: tensors[k] for k in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    save_tensors({k: tensors[k] for k in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(tmp_path / "model.safetensors")
    again = load_model(tmp_path)
    ids = torch.randint(0, 40, (1, 5))
    assert torch.equal(model.eval()(ids), again(ids))


def test_nested_state_round_trip_without_pickle(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 40, (1, 4))).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "data": {"pos": np.int64(5), "order": [3, 1, 2]}}
    save_state(state, tmp_path, "trainer")
    again = load_state(tmp_path, "trainer")
    assert again["step"] == 7 and again["data"] == {"pos": 5, "order": [3, 1, 2]}
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(again["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_rng_state_round_trip():
    import random

    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    folder = tmp_path / "ckpt"
    with atomic_directory(folder) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(folder) as d:
            (d / "a").write_text("2")
            raise RuntimeError("killed")
    assert (folder / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "f.txt"]


def test_atomic_writes_get_normal_permissions(tmp_path):
    import stat

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("1")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"1")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755
