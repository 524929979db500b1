"""What this CPU's matmul kernels do fast, so bf16/fp16 and quantized weights take the quicker path.

Without native 16-bit matrix instructions (AVX512-BF16, AVX512-FP16 or AMX; e.g. an AVX2-only EPYC),
PyTorch's bf16/fp16 GEMM and its int8/int4 weight-only kernels are compute-bound: measured on such a CPU,
a 512x768 @ 768x3072 product takes 258 ms in bf16 but 39 ms after upcasting both sides to fp32 (MKL),
and the int8/int4 kernels 89/95 ms against 52/65 ms for dequantize + fp32 GEMM. For a few rows (a decode
step) the 16-bit and quantized kernels still win, because they read fewer weight bytes.
"""

from __future__ import annotations

import functools

import torch

# Rows (tokens) from which a 16-bit float / a weight-only quantized product is faster in fp32 (measured
# crossovers on an AVX2 EPYC: ~8-16 rows for bf16/fp16, ~48-64 for int8/int4).
UPCAST_MIN_ROWS_16BIT = 16
UPCAST_MIN_ROWS_QUANTIZED = 64


@functools.lru_cache(maxsize=None)
def native_16bit_matmul(dtype: torch.dtype) -> bool:
    """True when this CPU multiplies `dtype` (bfloat16 or float16) matrices with native instructions."""
    cpu = torch.cpu
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    if dtype == torch.bfloat16:
        return amx or bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    if dtype == torch.float16:
        return bool(getattr(cpu, "_is_amx_fp16_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_fp16_supported", lambda: False)())
    return True


def upcast_rows(x: torch.Tensor, dtype: torch.dtype, min_rows: int) -> bool:
    """Whether a product of `x` (..., K) with `dtype` weights runs faster in fp32 on this machine."""
    rows = x.numel() // max(1, x.shape[-1])
    return x.device.type == "cpu" and rows >= min_rows and not native_16bit_matmul(dtype)


__all__ = ["native_16bit_matmul", "upcast_rows", "UPCAST_MIN_ROWS_16BIT", "UPCAST_MIN_ROWS_QUANTIZED"]
