"""Products of many rows run in fp32 on CPUs without native 16-bit GEMM; single rows keep the 16-bit kernels."""

import pytest
import torch
import torch.nn.functional as F

from gptforge import cpu_features
from gptforge.compress.quantize import Int4Linear, Int8Linear
from gptforge.config import Config
from gptforge.generate import prepare_for_decoding
from gptforge.model import GPT


@pytest.fixture(params=[False, True], ids=["no-native-16bit", "native-16bit"])
def native(request, monkeypatch):
    monkeypatch.setattr(cpu_features, "native_16bit_matmul", lambda dtype: request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_linears_upcast_only_many_rows_and_only_without_native_support(native, dtype):
    torch.manual_seed(0)
    model = prepare_for_decoding(GPT(Config.from_name("nano")).eval().to(dtype))
    linear = model.blocks[0].mlp.up
    many, one = torch.randn(2, 10, 64).to(dtype), torch.randn(1, 1, 64).to(dtype)
    fp32 = F.linear(many.float(), linear.weight.float(), linear.bias.float()).to(dtype)
    native_out = F.linear(many, linear.weight, linear.bias)
    with torch.no_grad():
        assert torch.equal(linear(many), native_out if native else fp32)
        assert torch.equal(linear(one), F.linear(one, linear.weight, linear.bias))  # decode: 16-bit weights
    assert model.state_dict().keys() == GPT(Config.from_name("nano")).state_dict().keys()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_prefill_matches_the_dequantized_weights_on_both_paths(native, kind):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    module = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, 32)
    x = torch.randn(cpu_features.UPCAST_MIN_ROWS_QUANTIZED + 3, 64)
    reference = F.linear(x, module.dequantized_weight(), linear.bias.detach())
    with torch.no_grad():
        out = module(x).float()
        single = module(x[:1]).float()
    torch.testing.assert_close(out, reference, atol=0.03, rtol=0.03)  # bf16 activations/outputs
    torch.testing.assert_close(single, reference[:1], atol=0.03, rtol=0.03)


def test_upcast_rows_counts_rows_and_respects_native_support(monkeypatch):
    monkeypatch.setattr(cpu_features, "native_16bit_matmul", lambda dtype: False)
    assert cpu_features.upcast_rows(torch.zeros(2, 8, 4), torch.bfloat16, 16)
    assert not cpu_features.upcast_rows(torch.zeros(1, 15, 4), torch.bfloat16, 16)
    monkeypatch.setattr(cpu_features, "native_16bit_matmul", lambda dtype: True)
    assert not cpu_features.upcast_rows(torch.zeros(2, 8, 4), torch.bfloat16, 16)
