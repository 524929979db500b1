"""Weight-only quantization for CPU decoding: int8 per output channel, int4 per group of inputs.

The linears run PyTorch's low-bit CPU kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`),
which read the int8/int4 weights directly and dequantize inside the kernel, so a decode step moves 4x (int8) or
~7x (int4) fewer weight bytes than fp32. Both kernels are fast with bf16 activations only (fp32 activations take
a slow path), so quantized models compute in bf16 by default. torchao 0.18's `Int8WeightOnlyConfig` was ~800x
slower than the aten kernel on this CPU (it dequantizes per call), hence the aten ops.

On disk (safetensors, gptforge parameter names, `quantization_config` in config.json):
  int8  `<linear>.weight` int8 (N, K), `<linear>.weight_scale` fp32 (N,)
  int4  `<linear>.weight_packed` uint8 (N, K/2) (low nibble = even column), `<linear>.weight_scale` and
        `<linear>.weight_zero` bf16 (N, K/group); a weight is (q - 8) * scale + zero, q in [0, 15].
The CPU kernel's packed int4 layout depends on the CPU, so it is rebuilt at load time from the portable one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cpu_features import UPCAST_MIN_ROWS_QUANTIZED, upcast_rows
from ..model import GPT

QUANT_METHOD = "gptforge"
METHODS = ("int8", "int4")
# Below this many rows a matmul is a decode step: weight-only kernels win. Above, int8 x int8 `_int_mm` wins.
DYNAMIC_ACTIVATION_MIN_ROWS = 16


# ---- tensor quantizers ------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 (N, K), scale fp32 (N,)) with weight ~= q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 with a clipping search per group.

    Returns (q uint8 (N, K) in [0, 15], scale (N, K/g), zero (N, K/g)) with weight ~= (q - 8) * scale + zero.
    Each group's range is shrunk by the factor (of a few) that minimises its squared error: outliers
    otherwise stretch the 16 levels and cost more accuracy than clipping them does.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 group_size {group_size} must divide the input width {k}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    best_err = torch.full(lo.shape, float("inf"))
    best_lo, best_scale = lo.clone(), ((hi - lo) / 15).clamp(min=1e-12)
    for shrink in (1.0, 0.95, 0.9, 0.85, 0.8):
        s_lo, s_hi = lo * shrink, hi * shrink
        scale = ((s_hi - s_lo) / 15).clamp(min=1e-12)
        q = torch.round((w - s_lo) / scale).clamp(0, 15)
        err = ((q * scale + s_lo - w) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, s_lo, best_lo)
        best_scale = torch.where(better, scale, best_scale)
    q = torch.round((w - best_lo) / best_scale).clamp(0, 15).to(torch.uint8).reshape(n, k)
    zero = best_lo + 8 * best_scale  # the kernel's convention: (q - 8) * scale + zero
    return q, best_scale.squeeze(-1), zero.squeeze(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, even columns in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float weights (N, K) from the portable int4 format."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = scale.shape[1]
    q = q.reshape(n, groups, k // groups)
    return ((q - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


# ---- modules ----------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 per output channel; optional dynamic int8 activations for prefill."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype = torch.bfloat16,
                 dynamic_activations: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.dynamic_activations = dynamic_activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._refresh()

    def _refresh(self) -> None:
        """Cache the scale/bias in the compute dtype (the kernel wants them to match the activations)."""
        self._scale_c = self.weight_scale.to(self.compute_dtype)
        self._bias_c = None if self.bias is None else self.bias.to(self.compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                    dynamic_activations: bool = False) -> "Int8Linear":
        """Quantize an nn.Linear."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                     dynamic_activations)
        module.weight, module.weight_scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        module._refresh()
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)  # (M, K)
        if self.dynamic_activations and x2.shape[0] >= DYNAMIC_ACTIVATION_MIN_ROWS:
            # Per-token symmetric int8 activations, int8 x int8 -> int32 matmul, then both scales.
            x_scale = (x2.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)  # (M, 1)
            xq = torch.round(x2.float() / x_scale).clamp(-127, 127).to(torch.int8)
            acc = torch._int_mm(xq, self.weight.t())  # (M, N) int32
            y = (acc.float() * x_scale * self.weight_scale[None, :]).to(self.compute_dtype)
        elif upcast_rows(x2, self.compute_dtype, UPCAST_MIN_ROWS_QUANTIZED):
            # Many rows (a prefill) on a CPU without native bf16: dequantize once and use the fp32 GEMM.
            weight = self.weight.float() * self.weight_scale[:, None]
            y = F.linear(x2.float(), weight).to(self.compute_dtype)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self._scale_c)
        if self._bias_c is not None:
            y = y + self._bias_c
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """y = x W^T + b with W stored as group-wise asymmetric int4 (CPU kernel layout rebuilt at load)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 group_size {group_size} must divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        # bf16 scales: what the kernel consumes anyway, and half the bytes of the per-group overhead.
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_weight: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """Quantize an nn.Linear."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, compute_dtype)
        q, scale, zero = quantize_int4(linear.weight, group_size)
        module.weight_packed = pack_int4(q)
        module.weight_scale, module.weight_zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        module.prepare()
        return module

    def prepare(self) -> None:
        """Build the CPU kernel's packed weight and (K/g, N, 2) scale-and-zero table from the stored tensors."""
        q = unpack_int4(self.weight_packed).to(torch.int32)  # (N, K)
        scale, zero = self.weight_scale.float(), self.weight_zero.float()
        pad = -self.out_features % 16  # the kernel packs rows in blocks of 16 (e.g. a 50257-token head)
        if pad:
            q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=q.dtype)])
            scale = torch.cat([scale, torch.zeros(pad, scale.shape[1])])
            zero = torch.cat([zero, torch.zeros(pad, zero.shape[1])])
        self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self._scale_zero = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(
            self.compute_dtype)  # (K/g, N padded, 2)
        self._bias_c = None if self.bias is None else self.bias.to(self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.weight_packed, self.weight_scale, self.weight_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_weight is None:
            self.prepare()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype).contiguous()  # (M, K)
        if upcast_rows(x2, self.compute_dtype, UPCAST_MIN_ROWS_QUANTIZED):
            # Many rows (a prefill) on a CPU without native bf16: dequantize once and use the fp32 GEMM.
            y = F.linear(x2.float(), self.dequantized_weight()).to(self.compute_dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._kernel_weight, self.group_size,
                                                           self._scale_zero)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        if self._bias_c is not None:
            y = y + self._bias_c
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


class QuantizedEmbedding(nn.Module):
    """Token embedding that dequantizes only the looked-up rows; shares its tensors with a tied int8/int4 head."""

    def __init__(self, source: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        # Kept outside the module tree so the tensors are saved once, under the head's names.
        self.__dict__["source"] = source
        self.compute_dtype = compute_dtype
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        # Empty marker: code that reads `model.wte.weight.dtype/.device` (KV-cache setup) gets the compute
        # dtype and device; the rows themselves live in the quantized head.
        self.register_buffer("weight", torch.empty(0, dtype=compute_dtype), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        src = self.source
        if isinstance(src, Int8Linear):
            rows = src.weight[ids].float() * src.weight_scale[ids][..., None]
        else:
            flat = ids.reshape(-1)
            rows = dequantize_int4(src.weight_packed[flat], src.weight_scale[flat], src.weight_zero[flat])
            rows = rows.reshape(*ids.shape, self.embedding_dim)
        return rows.to(self.compute_dtype)


# ---- model-level --------------------------------------------------------------------------------

def _linear_names(model: GPT, include_head: bool) -> list[str]:
    """The linears to quantize: every block projection and expert; MoE routers stay float (as llama.cpp keeps
    them), since a rounding error there changes which experts a token uses, not just a value."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name != "lm_head" and not name.endswith("mlp.router")]
    if include_head:
        names.append("lm_head")
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantization_config(method: str, group_size: int = 32, dynamic_activations: bool = False,
                        include_head: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The `quantization_config` dict stored in config.json."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {list(METHODS)}")
    if method == "int4" and (group_size <= 0 or group_size % 32):
        raise ValueError(f"group_size must be a positive multiple of 32 for int4, got {group_size}")
    if dynamic_activations and method != "int8":
        raise ValueError("dynamic_activations is only supported with method 'int8'")
    return {"quant_method": QUANT_METHOD, "bits": 8 if method == "int8" else 4,
            "group_size": group_size if method == "int4" else None,
            "activation": "dynamic_int8" if dynamic_activations else "none",
            "quantize_lm_head": include_head, "compute_dtype": str(compute_dtype).replace("torch.", "")}


def quantize_model(model: GPT, method: str = "int8", *, group_size: int = 32, dynamic_activations: bool = False,
                   include_head: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> GPT:
    """Replace the model's linears (in place) with int8 or int4 ones; the rest is cast to `compute_dtype`."""
    qconfig = quantization_config(method, group_size, dynamic_activations, include_head, compute_dtype)
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise ValueError("model is already quantized")
    for name in _linear_names(model, include_head):
        linear = model.get_submodule(name)
        if method == "int4" and linear.in_features % group_size:
            raise ValueError(f"{name}: input width {linear.in_features} is not a multiple of group_size {group_size}")
        _set_module(model, name, _quantized_like(linear, qconfig, compute_dtype, source=linear))
    _finish(model, qconfig, compute_dtype)
    return model


def _quantized_like(linear: nn.Linear, qconfig: dict[str, Any], compute_dtype: torch.dtype,
                    source: Optional[nn.Linear] = None) -> nn.Module:
    """A quantized module shaped like `linear` (quantized from `source` when given, else empty for loading)."""
    dynamic = qconfig["activation"] == "dynamic_int8"
    if qconfig["bits"] == 8:
        if source is not None:
            return Int8Linear.from_linear(source, compute_dtype, dynamic)
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, dynamic)
    if source is not None:
        return Int4Linear.from_linear(source, qconfig["group_size"], compute_dtype)
    return Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, qconfig["group_size"],
                      compute_dtype)


def _finish(model: GPT, qconfig: dict[str, Any], compute_dtype: torch.dtype) -> None:
    """Cast the float remainder, share a tied head with the embedding, and record the scheme on the model."""
    for module in model.modules():
        if not isinstance(module, (Int8Linear, Int4Linear, QuantizedEmbedding)):
            for name, param in module.named_parameters(recurse=False):
                param.data = param.data.to(compute_dtype)
    if model.config.tie_embeddings and qconfig["quantize_lm_head"]:
        model.wte = QuantizedEmbedding(model.lm_head, compute_dtype)
    model.quantization_config = qconfig


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds int8/int4 linears."""
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def quantized_state(model: GPT) -> dict[str, torch.Tensor]:
    """Tensors to save: quantized buffers plus the float remainder, under gptforge names."""
    state = dict(model.state_dict())  # a QuantizedEmbedding holds no tensors of its own
    if model.config.tie_embeddings and not model.quantization_config["quantize_lm_head"]:
        state.pop("lm_head.weight", None)  # the float head is the embedding
    return state


def quantized_checkpoint(model: GPT) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json additions, tensors) that describe a quantized model on disk (see `gptforge.loading.save`)."""
    if not is_quantized(model):
        raise ValueError("the model holds no quantized linears (call quantize_model first)")
    qconfig = dict(model.quantization_config)
    # Quantized tensors keep gptforge names: `transformers` cannot load this directory, gptforge can.
    extra = {"quantization_config": qconfig, "architectures": ["GPTForgeForCausalLM"], "model_type": "gptforge",
             "torch_dtype": qconfig["compute_dtype"]}
    return extra, quantized_state(model)


def load_quantized_into(model: GPT, qconfig: dict[str, Any], tensors: dict[str, torch.Tensor],
                        dtype: Optional[torch.dtype], source: str) -> GPT:
    """Swap an empty model's linears for quantized ones and fill them from a checkpoint's tensors."""
    from ..checkpoint import CheckpointError, load_state_into

    qconfig = dict(qconfig)
    config = model.config
    if qconfig.get("bits") not in (4, 8):
        raise CheckpointError(f"{source}: config.json quantization_config: 'bits' must be 4 or 8, "
                              f"got {qconfig.get('bits')!r}")
    method = qconfig.get("quant_method") or qconfig.get("method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: unsupported quantization method {method!r}; supported: {QUANT_METHOD!r}")
    if model.wte.weight.device.type != "cpu":
        raise CheckpointError(f"quantized models run on the CPU kernels only; got device {model.wte.weight.device}")
    compute_dtype = dtype or getattr(torch, qconfig.get("compute_dtype", "bfloat16"))
    head_quantized = bool(qconfig.get("quantize_lm_head", True))
    for name in _linear_names(model, head_quantized):
        _set_module(model, name, _quantized_like(model.get_submodule(name), qconfig, compute_dtype))
    state = dict(tensors)
    if config.tie_embeddings and not head_quantized:
        state["lm_head.weight"] = state["wte.weight"]
    if config.tie_embeddings and head_quantized:
        model.wte = nn.Module()  # placeholder: replaced by the shared QuantizedEmbedding in _finish
    load_state_into(model, state, source=source)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module._refresh()
        elif isinstance(module, Int4Linear):
            module.prepare()
    if config.tie_embeddings and not head_quantized:
        model.lm_head.weight = model.wte.weight
    _finish(model, qconfig, compute_dtype)
    return model


def dequantize_model(model: GPT, dtype: torch.dtype = torch.float32) -> GPT:
    """A plain float GPT with the quantized weights expanded (for HF/GGUF export of a quantized model)."""
    if not is_quantized(model):
        return model.to(dtype)
    plain = GPT(model.config)
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            state[f"{name}.weight"] = module.dequantized_weight()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
    for name, tensor in model.state_dict().items():
        base = name.rsplit(".", 1)[0]
        if not isinstance(_get(model, base), (Int8Linear, Int4Linear)):
            state[name] = tensor.float()
    if model.config.tie_embeddings:
        state["wte.weight"] = state["lm_head.weight"]
    plain.load_state_dict(state, strict=False)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.wte.weight
    return plain.to(dtype).eval()


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


__all__ = ["Int8Linear", "Int4Linear", "QuantizedEmbedding", "quantize_model", "quantized_checkpoint", "load_quantized_into",
           "dequantize_model", "quantize_int8", "quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4",
           "is_quantized", "quantization_config", "weight_bytes", "METHODS", "QUANT_METHOD"]
