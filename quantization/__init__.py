"""Quantization by hand: NF4 + double quantization (QLoRA), int8 (LLM.int8()),
frozen Linear4bit/Linear8bit layers, quantize_model, memory accounting, files;
and QLoRALinear (quantization/qlora.py, the one module that also uses lora)."""
from .compiled import CompileError, compiled_dequantize_nf4
from .int8 import Int8Tensor, dequantize_int8, int8_matmul, quantize_int8
from .io import load_quantized, save_quantized
from .layers import DequantLinearFunction, Linear4bit, Linear8bit
from .model import (HEAD_NAMES, LayerMemory, MemoryReport, RequantError, RequantReport, memory_report,
                    plan_quantization, quantize_model, requantize_merged)
from .nf4 import (NF4Tensor, dequantize_dynamic8, dequantize_nf4, dynamic_map_signed, nf4_bits_formula, nf4_levels,
                  pack_nibbles, quantize_dynamic8, quantize_nf4, unpack_nibbles)

__all__ = [
    "NF4Tensor", "nf4_levels", "dynamic_map_signed", "quantize_nf4", "dequantize_nf4", "nf4_bits_formula",
    "pack_nibbles", "unpack_nibbles", "quantize_dynamic8", "dequantize_dynamic8",
    "compiled_dequantize_nf4", "CompileError",
    "Int8Tensor", "quantize_int8", "dequantize_int8", "int8_matmul",
    "Linear4bit", "Linear8bit", "DequantLinearFunction",
    "quantize_model", "plan_quantization", "memory_report", "MemoryReport", "LayerMemory",
    "requantize_merged", "RequantReport", "RequantError",
    "save_quantized", "load_quantized", "HEAD_NAMES", "QLoRALinear",
]


def __getattr__(name: str):
    """QLoRALinear lives in quantization/qlora.py, the one module that uses lora too: imported on
    first use (PEP 562), so `import quantization` needs torch alone (see qlora.py's docstring)."""
    if name == "QLoRALinear":
        from .qlora import QLoRALinear
        return QLoRALinear
    raise AttributeError(f"module 'quantization' has no attribute {name!r}")
