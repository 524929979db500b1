"""Compression: weight-only int8/int4 quantization and pruning (unstructured and structured).

`gptforge.loading.save` writes a quantized model (with a `quantization_config`) and `gptforge.loading.load`
reads it back through `load_quantized_into`.
"""

from __future__ import annotations

from .quantize import (Int4Linear, Int8Linear, QuantizedEmbedding, dequantize_model, is_quantized,
                       load_quantized_into, quantize_model, quantized_checkpoint, weight_bytes)
from .prune import (PRUNE_METHODS, activation_norms, magnitude_prune, prune_model, sparsity_of, structured_prune,
                    wanda_prune)

__all__ = ["Int8Linear", "Int4Linear", "QuantizedEmbedding", "quantize_model", "quantized_checkpoint", "load_quantized_into",
           "dequantize_model", "is_quantized", "weight_bytes", "PRUNE_METHODS", "prune_model", "magnitude_prune",
           "wanda_prune", "structured_prune", "activation_norms", "sparsity_of"]
