"""Adapter layers (LoRA, Sparse LoRA, HiRA, DoRA) and model surgery; depends on torch only."""
from lora.base import AdapterLayer, LowRankAdapter, base_weight, is_linear_like, lora_scaling, resized_low_rank
