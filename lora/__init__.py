"""Adapter layers (LoRA, Sparse LoRA, HiRA, DoRA, AdaLoRA's SVD form, IA3), model surgery, named adapters;
depends on torch only
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
from lora.adapter_io import load_adapter, load_adapters, save_adapter, save_adapters
from lora.combine import add_weighted_adapter
from lora.ia3 import IA3Linear
from lora.model import add_ia3_to_model
from lora.config import IA3Config
from lora.multi import MultiAdapterLinear
from lora.named import (active_adapter, add_adapter, delete_adapter, disable_adapters, list_adapters, mixed_batch,
                        set_adapter, unload)
from lora.svd import SVDLoRALinear

# loralib's name for the class every adapter layer derives from (there, `LoRALayer`; here, AdapterLayer).
LoRALayer = AdapterLayer
