import pytest
import torch

from gptforge.cli import main
from gptforge.compress import magnitude_prune, prune_model, sparsity_of, structured_prune, wanda_prune
from gptforge.compress.prune import activation_norms, calibration_batches, prunable_linears, recover_finetune
from gptforge.loading import load_model, save

from compress_helpers import HELD_OUT, TEXT, greedy, perplexity, tiny_tokenizer


def _calibration(model):
    return calibration_batches(tiny_tokenizer().encode(TEXT), 48, 4)


def test_magnitude_reaches_sparsity_and_keeps_largest(trained_dirs):
    model = load_model(trained_dirs["gpt2"])
    original = model.blocks[0].mlp.up.weight.detach().clone()
    magnitude_prune(model, 0.5)
    assert sparsity_of(model) == pytest.approx(0.5, abs=0.01)
    kept = model.blocks[0].mlp.up.weight != 0
    assert original.abs()[kept].min() >= original.abs()[~kept].max()


def test_wanda_prunes_per_row_by_weight_times_activation(trained_dirs):
    model = load_model(trained_dirs["llama"])
    calibration = _calibration(model)
    name = "blocks.1.mlp.down"
    weight = model.get_submodule(name).weight.detach().clone()
    norms = activation_norms(model, calibration, [name])[name]
    wanda_prune(model, 0.5, calibration)
    for linear in prunable_linears(model).values():
        assert torch.all((linear.weight == 0).sum(dim=1) == linear.in_features // 2)
    score = weight.abs() * norms
    expected_kept = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, score.topk(weight.shape[1] // 2).indices, True)
    assert torch.equal(model.get_submodule(name).weight != 0, expected_kept)
    magnitude_kept = torch.zeros_like(expected_kept).scatter_(1, weight.abs().topk(weight.shape[1] // 2).indices, True)
    assert not torch.equal(expected_kept, magnitude_kept)  # the activations changed the choice


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_structured_prune_really_shrinks_and_still_works(trained_dirs, tmp_path, family):
    model = load_model(trained_dirs[family])
    c = model.config
    pruned = structured_prune(model, 0.5, _calibration(model))
    pc = pruned.config
    assert pc.n_head == c.n_head // 2 and pc.kv_heads == c.kv_heads // 2 and pc.hdim == c.hdim
    assert pc.ffn_dim < c.ffn_dim
    assert pruned.num_params() < model.num_params()
    assert pruned.blocks[0].attn.qkv.weight.shape[0] == (pc.n_head + 2 * pc.kv_heads) * pc.hdim
    save(tmp_path / "p", pruned, tiny_tokenizer())
    loaded = load_model(tmp_path / "p")
    assert loaded.config == pc
    ids = torch.tensor([tiny_tokenizer().encode(HELD_OUT)[:20]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), pruned(ids))
    assert perplexity(loaded) < loaded.config.vocab_size  # still a language model, better than uniform
    assert len(greedy(loaded, ids[0].tolist(), 5)) == 5


def test_structured_prune_zero_sparsity_is_identity(trained_dirs):
    model = load_model(trained_dirs["llama"])
    same = structured_prune(model, 0.0)
    ids = torch.tensor([[3, 7, 11, 13]])
    with torch.no_grad():
        torch.testing.assert_close(same(ids), model(ids))


@pytest.mark.slow
def test_recovery_finetune_keeps_zeros_and_lowers_loss(trained_dirs, tmp_path):
    model = load_model(trained_dirs["gpt2"])
    magnitude_prune(model, 0.7)
    before = perplexity(model)
    recover_finetune(model, tiny_tokenizer().encode(TEXT), str(tmp_path / "run"), steps=8, lr=2e-3, batch_size=4,
                     seq_len=32)
    assert sparsity_of(model) == pytest.approx(0.7, abs=0.01)
    assert perplexity(model) < before


def test_cli_prune_and_bad_arguments(trained_dirs, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "w"
    assert main(["prune", "--model", trained_dirs["gpt2"], "--sparsity", "0.5", "--method", "wanda",
                 "--calibration", str(calib), "--out", str(out)]) == 0
    assert sparsity_of(load_model(out)) == pytest.approx(0.5, abs=0.01)
    for bad, message in ((["--sparsity", "1.0", "--method", "magnitude"], "sparsity must be in [0, 1), got 1.0"),
                         (["--sparsity", "-0.1", "--method", "magnitude"], "sparsity must be in [0, 1)"),
                         (["--sparsity", "0.5", "--method", "random"], "unknown pruning method 'random'"),
                         (["--sparsity", "0.5", "--method", "wanda"], "--calibration FILE is required")):
        assert main(["prune", "--model", trained_dirs["gpt2"], "--out", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_model(load_model(trained_dirs["gpt2"]), "l0", 0.5)
