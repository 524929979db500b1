import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptforge.cli import main  # noqa: E402
from gptforge.compress import quantize_model, structured_prune  # noqa: E402
from gptforge.config import Config  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.tokenizer import Tokenizer  # noqa: E402
from gptforge.loading import load_model, save

TEXT = "to be or not to be, that is the question: whether tis nobler in the mind to suffer. " * 30


def tiny(family: str) -> GPT:
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT(Config.from_name("nano", vocab_size=320, block_size=64)).eval()
    return GPT(Config.from_name("llama-nano", vocab_size=320, block_size=64, n_head=4, n_kv_head=2)).eval()


def hf_logits(directory, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_hf_logits_equal_in_transformers(tmp_path, family):
    model = tiny(family)
    save(tmp_path / "m", model, Tokenizer.train_bpe([TEXT], 300))
    assert main(["export", "--model", str(tmp_path / "m"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 5, 42, 7, 300, 12]])
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ours, atol=1e-5, rtol=1e-5)


def test_export_hf_of_quantized_and_pruned_models(tmp_path):
    model = tiny("llama")
    pruned = structured_prune(model, 0.5)  # head_dim becomes explicit: Llama's config expresses it
    save(tmp_path / "p", pruned)
    assert main(["export", "--model", str(tmp_path / "p"), "--format", "hf", "--out", str(tmp_path / "p-hf")]) == 0
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(tmp_path / "p-hf", ids), pruned(ids), atol=1e-5, rtol=1e-5)

    quantized = quantize_model(tiny("gpt2"), "int8")
    save(tmp_path / "q", quantized)
    assert main(["export", "--model", str(tmp_path / "q"), "--format", "hf", "--out", str(tmp_path / "q-hf")]) == 0
    from gptforge.compress import dequantize_model

    with torch.no_grad():
        expected = dequantize_model(load_model(tmp_path / "q"))(ids)
    torch.testing.assert_close(hf_logits(tmp_path / "q-hf", ids), expected, atol=1e-5, rtol=1e-5)


def test_export_bad_arguments(tmp_path, capsys):
    save(tmp_path / "m", tiny("gpt2"))
    assert main(["export", "--model", str(tmp_path / "m"), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err
    save(tmp_path / "p", structured_prune(tiny("gpt2"), 0.5))  # head_dim != n_embd / n_head
    assert main(["export", "--model", str(tmp_path / "p"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "no transformers equivalent" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "m"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()
