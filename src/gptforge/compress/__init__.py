"""Compression: weight-only int8/int4 quantization and pruning (unstructured and structured).

Importing this package registers the quantized-checkpoint loader with `gptforge.interop.hf`, so
`GPT.from_pretrained` loads directories written by `save_quantized`.
"""

from __future__ import annotations

from ..interop.hf import QUANTIZED_LOADERS
from .quantize import (QUANT_METHOD, Int4Linear, Int8Linear, QuantizedEmbedding, dequantize_model, is_quantized,
                       load_quantized, quantize_model, save_quantized, weight_bytes)
from .prune import (PRUNE_METHODS, activation_norms, magnitude_prune, prune_model, sparsity_of, structured_prune,
                    wanda_prune)

QUANTIZED_LOADERS[QUANT_METHOD] = load_quantized

__all__ = ["Int8Linear", "Int4Linear", "QuantizedEmbedding", "quantize_model", "save_quantized", "load_quantized",
           "dequantize_model", "is_quantized", "weight_bytes", "PRUNE_METHODS", "prune_model", "magnitude_prune",
           "wanda_prune", "structured_prune", "activation_norms", "sparsity_of"]
