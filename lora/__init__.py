"""Adapter layers (LoRA, Sparse LoRA, HiRA, DoRA, AdaLoRA's SVD form) and model surgery; depends on torch only
(and safetensors, for adapter files)."""
from lora.base import (AdapterLayer, LowRankAdapter, base_weight, is_linear_like, is_quantized, lora_scaling,
                       module_device, resized_low_rank)
from lora.dora import DoRALinear
from lora.hira import HiRALinear
from lora.layers import LoRALinear
from lora.sparse import SparseLoRALinear, cubic_sparsity
from lora.config import LoraConfig, remembered_config
from lora.model import (adapter_layers, add_lora_to_model, count_parameters, lora_state_dict,
                        mark_only_lora_as_trainable)
from lora.merge import merge_adapters, merge_lora_weights, unmerge_lora_weights
from lora.adapter_io import load_adapter, save_adapter
from lora.svd import SVDLoRALinear

# loralib's name for the class every adapter layer derives from (there, `LoRALayer`; here, AdapterLayer).
LoRALayer = AdapterLayer
