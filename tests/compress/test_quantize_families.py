"""int8/int4 weight-only quantization for every family, MoE experts included (tiny random HF models)."""

import pytest
import torch

from gptforge.compress.quantize import Int4Linear, Int8Linear, dequantize_model, quantize_model
from gptforge.generate import generate
from gptforge.loading import load_model, save
from hf_families import CASES, VOCAB, hf_model

pytest.importorskip("transformers")
# Random Gaussian weights are the hardest case for 4 bits (no structure to exploit): bounds on the relative
# logit error against the float model, measured at 0.02-0.04 (int8) and 0.18-0.35 (int4) across the families.
BOUND = {"int8": 0.06, "int4": 0.45}


@pytest.fixture(scope="module", params=CASES)
def family_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model(request.param).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_family_model(family_dir, method, tmp_path):
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        reference = load_model(family_dir)(ids)
        model = quantize_model(load_model(family_dir), method)
        out = model(ids).float()
        kind = Int8Linear if method == "int8" else Int4Linear
        linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, (kind, torch.nn.Linear))}
        assert all(cls is kind for n, cls in linears.items() if not n.endswith("mlp.router")), linears
        experts = [n for n in linears if ".experts." in n]
        assert not model.moe_layers or len(experts) == 3 * sum(len(m.experts) for m in model.moe_layers)
        assert all(type(m.router) is torch.nn.Linear for m in model.moe_layers)  # routing stays float
        # the kernels compute what the stored int weights say (up to bf16 activations: 1-4% here) ...
        plain = dequantize_model(model)(ids)
        assert ((out - plain).norm() / plain.norm()).item() < 0.05
        # ... and those weights are close to the float model's
        assert ((out - reference).norm() / reference.norm()).item() < BOUND[method]
        save(tmp_path / "q", model)
        loaded = load_model(tmp_path / "q")
        assert torch.equal(loaded(ids), model(ids))
    tokens = generate(loaded, [[5, 17, 42]], max_new_tokens=8, eos_token_id=[])[0].token_ids
    assert len(tokens) == 8
