"""The model alone: shapes, KV cache equivalence, padding, presets, sizes, config errors."""

import pytest
import torch

from gptforge import GPT, Config, ConfigError
from gptforge.model import causal_lm_loss
from gptforge.loading import load_model, save

FAMILIES = {
    "gpt2": dict(pos_embedding="learned"),
    "llama": dict(family="llama", pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1,
                  tie_embeddings=False),
    "sinusoidal": dict(pos_embedding="sinusoidal"),
    "window": dict(family="mistral", pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, sliding_window=5),
}


def tiny(kind: str) -> GPT:
    cfg = Config(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32, **FAMILIES[kind])
    return GPT(cfg).eval()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_logits_shape_and_loss(kind):
    model = tiny(kind)
    ids = torch.randint(0, 50, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, 50)
    loss = causal_lm_loss(logits[:, :-1], ids[:, 1:])
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near uniform at init


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_kv_cache_decoding_equals_full_forward(kind):
    model = tiny(kind)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 32)
        parts = [model(ids[:, :7], cache_slots=torch.arange(7))]
        for t in range(7, 12):
            parts.append(model(ids[:, t:t + 1], cache_slots=torch.tensor([t])))
        model.clear_cache()
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padding_with_cache_matches_unpadded(kind):
    model = tiny(kind)
    a, b = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 5))
    pad = 4
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)], 0)
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = torch.stack([torch.arange(9), (torch.arange(9) - pad).clamp(min=0)])
    with torch.no_grad():
        model.setup_cache(2, 16)
        out = model(batch, positions, cache_slots=torch.arange(9), key_mask=key_mask)
        step = model(torch.tensor([[3], [4]]), torch.tensor([[9], [5]]), cache_slots=torch.tensor([9]),
                     key_mask=key_mask)
        model.clear_cache()
        ref_a = model(torch.cat([a, torch.tensor([[3]])], 1))
        ref_b = model(torch.cat([b, torch.tensor([[4]])], 1))
    assert torch.allclose(out[0], ref_a[0, :9], atol=1e-5)
    assert torch.allclose(out[1, pad:], ref_b[0, :5], atol=1e-5)
    assert torch.allclose(step[0, 0], ref_a[0, 9], atol=1e-5)
    assert torch.allclose(step[1, 0], ref_b[0, 5], atol=1e-5)


def test_cache_rows_subset_decoding():
    model = tiny("llama")
    seqs = [torch.randint(0, 50, (1, n)) for n in (6, 3, 8)]
    with torch.no_grad():
        model.setup_cache(4, 16)
        # Prefill each request into its own cache row, then decode rows 0 and 2 together.
        for row, s in zip([0, 1, 2], seqs):
            model(s, cache_slots=torch.arange(s.shape[1]), cache_rows=torch.tensor([row]))
        rows = torch.tensor([0, 2])
        slots = torch.tensor([[6], [8]])
        step = model(torch.tensor([[1], [2]]), cache_slots=slots, cache_rows=rows,
                     key_mask=torch.ones(2, 16, dtype=torch.bool))
        model.clear_cache()
        ref0 = model(torch.cat([seqs[0], torch.tensor([[1]])], 1))[0, -1]
        ref2 = model(torch.cat([seqs[2], torch.tensor([[2]])], 1))[0, -1]
    assert torch.allclose(step[0, 0], ref0, atol=1e-5)
    assert torch.allclose(step[1, 0], ref2, atol=1e-5)


def test_last_only_and_too_long_input():
    model = tiny("gpt2")
    ids = torch.randint(0, 50, (1, 10))
    assert torch.allclose(model(ids, last_only=True)[:, 0], model(ids)[:, -1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "nano", "micro", "llama-nano", "llama-micro"])
def test_presets_param_count_matches_config(name):
    cfg = Config.from_name(name)
    if cfg.n_embd > 800:
        pytest.skip("large preset: counted from config alone")
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    if name == "gpt2":
        assert model.num_params() == 124_439_808  # the well-known GPT-2 small count
    assert cfg.flops_per_token() > 6 * cfg.num_params(non_embedding=True)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_embd"):
        Config(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="n_kv_head"):
        Config(n_head=4, n_embd=32, n_kv_head=3)
    with pytest.raises(ConfigError, match="norm"):
        Config(norm="batchnorm")
    with pytest.raises(ConfigError, match="unknown model preset"):
        Config.from_name("gpt5")
    with pytest.raises(ConfigError, match="dropout"):
        Config(dropout=1.5)


def test_dropout_active_only_in_training():
    model = GPT(Config(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.5,
                       attn_dropout=0.5, embd_dropout=0.5))
    ids = torch.randint(0, 50, (2, 8))
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_relu2_mlp_is_relu_squared_and_round_trips(tmp_path):
    torch.manual_seed(0)
    config = Config.from_name("llama-nano", vocab_size=64, block_size=16, mlp="relu2")
    model = GPT(config).eval()
    assert config.ffn_dim == 4 * config.n_embd and not hasattr(model.blocks[0].mlp, "gate")
    assert model.num_params() == config.num_params()
    mlp, x = model.blocks[0].mlp, torch.randn(2, 5, config.n_embd)
    expected = mlp.down(torch.clamp(mlp.up(x), min=0) ** 2)
    torch.testing.assert_close(mlp(x), expected)
    ids = torch.randint(0, 64, (1, 12))
    save(tmp_path / "m", model)
    reloaded = load_model(tmp_path / "m")
    assert reloaded.config.mlp == "relu2"
    torch.testing.assert_close(reloaded(ids), model(ids))
    with pytest.raises(ConfigError, match="mlp must be one of .*relu2.*got 'relu3'"):
        Config.from_name("nano", mlp="relu3")
