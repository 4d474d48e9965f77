"""Adapter files in Hugging Face PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

The format (which tensor goes under which key): lora/adapter_format.py; the config
beside the tensors: lora/peft_config.py; saving: lora/adapter_save.py; loading:
lora/adapter_load.py. Everything is re-exported here, the name the rest of the
project imports from.
"""
from __future__ import annotations

from lora.adapter_format import PREFIX, SPARSE_MASKS, TO_FILE, WEIGHTS_NAME, file_key, tensor_plan  # noqa: F401
from lora.adapter_load import load_adapter, load_adapters, read_tensors  # noqa: F401
from lora.adapter_save import save_adapter, save_adapters  # noqa: F401
from lora.peft_config import (CONFIG_NAME, PAIRING_KEY, config_from_peft, pairing_digest,  # noqa: F401
                              read_config, resolve_config)
