import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptforge.cli import main
from gptforge.compress import Int4Linear, Int8Linear, dequantize_model, quantize_model
from gptforge.compress.quantize import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from gptforge.loading import load, load_model, save

from compress_helpers import greedy, perplexity, tiny_tokenizer


def test_int4_pack_roundtrip_and_clipping_search():
    q = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = torch.randn(8, 64)
    q, scale, zero = quantize_int4(w, 32)
    err = (dequantize_int4(pack_int4(q), scale, zero) - w).abs()
    assert err.max() < (w.abs().max() / 7)  # 16 levels over the group's range
    assert q.max() <= 15


@pytest.mark.parametrize("cls", ["int8", "int4"])
def test_linear_kernels_match_dequantized_weights(cls):
    linear = torch.nn.Linear(64, 96)
    q = Int8Linear.from_linear(linear) if cls == "int8" else Int4Linear.from_linear(linear, 32)
    x = torch.randn(3, 5, 64)
    reference = x @ q.dequantized_weight().t() + linear.bias.detach()
    out = q(x).float()
    assert out.shape == (3, 5, 96)
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.02)  # bf16 activations
    assert not torch.equal(q.dequantized_weight(), linear.weight.detach())  # really quantized


def test_dynamic_int8_activations_close_for_prefill():
    linear = torch.nn.Linear(64, 96)
    plain, dynamic = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear, dynamic_activations=True)
    x = torch.randn(1, 32, 64)  # 32 rows: takes the int8 x int8 path
    torch.testing.assert_close(dynamic(x).float(), plain(x).float(), atol=0.08, rtol=0.05)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_saves_loads_generates_and_evaluates(trained_dirs, tmp_path, family, method):
    float_model = load_model(trained_dirs[family])
    ppl_float = perplexity(float_model)
    prompt = tiny_tokenizer().encode("the quick brown")
    tokens_float = greedy(float_model, prompt, 12)

    model = quantize_model(load_model(trained_dirs[family]), method)
    save(tmp_path / "q", model, tiny_tokenizer())
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf["quantization_config"]["bits"] == (8 if method == "int8" else 4)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        name = "blocks.0.mlp.up.weight" if method == "int8" else "blocks.0.mlp.up.weight_packed"
        assert f.get_tensor(name).dtype == (torch.int8 if method == "int8" else torch.uint8)

    loaded, tokenizer = load(tmp_path / "q")
    assert isinstance(loaded.blocks[0].attn.qkv, Int8Linear if method == "int8" else Int4Linear)
    assert tokenizer is not None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))  # the file holds exactly what was quantized
    ppl = perplexity(loaded)
    assert ppl < ppl_float * (1.02 if method == "int8" else 1.10)
    tokens = greedy(loaded, prompt, 12)
    assert len(tokens) == 12
    if method == "int8":
        assert tokens[:6] == tokens_float[:6]


def test_quantized_size_shrinks(trained_dirs, tmp_path):
    model = load_model(trained_dirs["gpt2"])
    float_size = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    for method, factor in (("int8", 0.4), ("int4", 0.3)):
        save(tmp_path / method, quantize_model(load_model(trained_dirs["gpt2"]), method))
        assert (tmp_path / method / "model.safetensors").stat().st_size < float_size * factor


def test_dequantize_model_matches_quantized(trained_dirs):
    q = quantize_model(load_model(trained_dirs["llama"]), "int8")
    plain = dequantize_model(q)
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), q(ids).float(), atol=0.05, rtol=0.05)
    assert all(isinstance(m, torch.nn.Linear) for n, m in plain.named_modules() if n.endswith("qkv"))


def test_quantized_directory_loads_in_a_fresh_process(trained_dirs, tmp_path):
    """Loading chooses the quantized path from config.json alone: nothing has to import gptforge.compress first."""
    import subprocess
    import sys

    save(tmp_path / "q", quantize_model(load_model(trained_dirs["gpt2"]), "int8"), tiny_tokenizer())
    code = ("import sys; from gptforge.loading import load; m, t = load(sys.argv[1]); "
            "print(type(m.blocks[0].attn.qkv).__name__, t is not None)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Int8Linear", "True"]


def test_cli_quantize_and_bad_arguments(trained_dirs, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["quantize", "--model", trained_dirs["gpt2"], "--method", "int8", "--out", str(out),
                 "--dynamic-activations"]) == 0
    assert load_model(out).blocks[0].mlp.up.dynamic_activations
    assert main(["quantize", "--model", trained_dirs["llama"], "--method", "int4", "--keep-lm-head",
                 "--out", str(tmp_path / "q4")]) == 0
    q4 = load_model(tmp_path / "q4")
    assert isinstance(q4.blocks[0].mlp.gate, Int4Linear) and isinstance(q4.lm_head, torch.nn.Linear)
    assert main(["quantize", "--model", trained_dirs["gpt2"], "--method", "int3", "--out", str(tmp_path / "x")]) == 2
    assert "unknown quantization method 'int3'" in capsys.readouterr().err
    assert main(["quantize", "--model", trained_dirs["gpt2"], "--method", "int4", "--group-size", "48",
                 "--out", str(tmp_path / "x")]) == 2
    assert "group_size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_already_quantized_is_refused(trained_dirs):
    q = quantize_model(load_model(trained_dirs["gpt2"]), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4")


def test_cli_reports_each_method_s_own_size_from_the_files(trained_dirs, tmp_path, capsys):
    from gptforge.commands.quantize import weights_file_bytes
    from gptforge.formatting import human_bytes

    source = Path(trained_dirs["llama"])
    float_bytes = weights_file_bytes(source)
    lines = {}
    for method in ("int8", "int4"):
        out = tmp_path / method
        assert main(["quantize", "--model", str(source), "--method", method, "--out", str(out)]) == 0
        lines[method] = capsys.readouterr().out.strip()
        size = (out / "model.safetensors").stat().st_size
        assert weights_file_bytes(out) == size
        assert lines[method] == (f"Quantized {source} to {method} in {out}: weights {human_bytes(float_bytes)} -> "
                                 f"{human_bytes(size)} on disk ({float_bytes / size:.1f}x smaller).")
    assert lines["int8"] != lines["int4"]
    assert weights_file_bytes(tmp_path / "int4") < weights_file_bytes(tmp_path / "int8") < float_bytes
