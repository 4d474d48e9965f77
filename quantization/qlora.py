"""QLoRA as one layer, `QLoRALinear(module, rank=8)`: a frozen quantized base plus LoRA.

The library builds QLoRA by composition, add_lora_to_model(quantize_model(model, bits=4), ...):
the adapter (lora/) only calls its base, and the base (quantization/) knows nothing of
adapters. This file is the one place where the two packages meet (DESIGN.md's composition
module for QLoRA conveniences), so the layering stays visible:

    lora/           imports neither quantization nor this file
    quantization/   its core (nf4, int8, layers, model, io) never imports lora
    qlora.py        imports both; quantization/__init__ exports QLoRALinear lazily, on first
                    use (`from quantization import QLoRALinear`), so `import quantization`
                    still needs torch alone and no import cycle can arise
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lora.base import AdapterLayer
from lora.layout import is_quantized
from lora.layers import LoRALinear

from .layers import Linear4bit, Linear8bit, is_conv1d
from .model import resolve_bits

QUANTIZED = {4: Linear4bit, 8: Linear8bit}


class QLoRALinear(LoRALinear):
    """y = dequant(Q) x + b + s * B A dropout(x)       (Dettmers et al. 2023, arXiv:2305.14314)

    Q       the frozen base weight W0 (out, in) stored in NF4 with double-quantized scales
            (bits=4, default) or row-wise int8 (bits=8); dequantized on the fly
    A, B, s LoRA's factors and scaling, exactly as in LoRALinear (this class adds nothing
            to the math; it is a LoRALinear whose base is quantized)

    `base_layer` is either a float nn.Linear (or a transformers Conv1D), quantized here
    (the given layer is left as it is; `bits` or `method` ("nf4" | "int8") choose the
    format, as in quantize_model, and `compute_dtype`, `blocksize`, `double_quant` go to
    Linear4bit/Linear8bit.from_linear), or an already quantized Linear-like layer
    (Linear4bit, Linear8bit, or anything with in_features, out_features and dequantize()),
    used as it is. Saved and loaded as a "lora" adapter (a PEFT LoRA file); merging into
    the packed base is refused, as for any quantized base (lora.merge_lora_weights gives a
    float layer instead).
    """

    def __init__(self, base_layer: nn.Module, *, bits: int | None = None, method: str | None = None,
                 compute_dtype: torch.dtype | None = None, blocksize: int | None = None,
                 double_quant: bool | None = None, **lora_options):
        if isinstance(base_layer, AdapterLayer):
            raise TypeError(f"QLoRALinear: base_layer is already an adapter ({type(base_layer).__name__}); "
                            f"give the layer it wraps")
        if isinstance(base_layer, nn.Linear) or is_conv1d(base_layer):
            bits = resolve_bits(bits, method, "QLoRALinear")
            if bits not in QUANTIZED:
                raise ValueError(f"QLoRALinear: bits must be 4 or 8, got {bits!r}")
            options = {"compute_dtype": compute_dtype}
            if blocksize is not None:
                options["blocksize"] = blocksize
            if double_quant is not None:
                if bits != 4:
                    raise ValueError("QLoRALinear: double_quant is an NF4 option (bits=4), got bits=8")
                options["double_quant"] = double_quant
            base_layer = QUANTIZED[bits].from_linear(base_layer, **options).to(base_layer.weight.device)
        elif is_quantized(base_layer):
            given = {k: v for k, v in dict(bits=bits, method=method, compute_dtype=compute_dtype,
                                            blocksize=blocksize, double_quant=double_quant).items() if v is not None}
            if given:
                raise TypeError(f"QLoRALinear: base_layer is already quantized ({type(base_layer).__name__}), "
                                f"so the quantization options {sorted(given)} do not apply")
        else:
            raise TypeError(f"QLoRALinear: base_layer must be an nn.Linear or a Conv1D (quantized here) or a "
                            f"quantized Linear-like layer (Linear4bit, Linear8bit), got {type(base_layer).__name__}")
        super().__init__(base_layer, **lora_options)
