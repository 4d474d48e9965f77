"""What an adapter file holds: PEFT's tensor keys, and the model tensor behind each key.

Tensor keys (module path as in `model.named_modules()`):

    base_model.model.<module>.lora_A.weight          (r, in)    all methods
    base_model.model.<module>.lora_B.weight          (out, r)   all methods
    base_model.model.<module>.lora_magnitude_vector  (out,)     DoRA (PEFT's name for our `lora_magnitude`)
    base_model.model.<module>.<name>                 any other adapter tensor under its own name:
                                                     sparse `mask_A` (r, in), `mask_B` (out, r);
                                                     adalora `lora_E` (r, 1), `rank_mask` (r,)
    base_model.model.<module>.<param>                parameters of `modules_to_save` (as PEFT)

`tensor_plan` lists (file key, tensor in the model) for a model and its adapter layers;
saving (lora/adapter_save.py) writes those tensors and loading (lora/adapter_load.py)
copies into them, so the two agree on the keys. The config beside them (PEFT's LoRA
fields): lora/peft_config.py.

`fan_in_fan_out` says, as in PEFT, that the adapted layers store their weight (in, out)
(transformers' `Conv1D`, Hugging Face GPT-2): it is written true when they do. The
factors do not depend on it (`lora_A` is (r, in) and `lora_B` (out, r) in either
layout, in PEFT too), so a file loads whatever its flag says, and one from HF GPT-2
(Conv1D) loads into our GPT-2 (nn.Linear, same names) and back. PEFT does the same:
it resets the flag per layer from the layer's type, with a warning.

`modules_to_save` entries select modules as PEFT selects them (name ends with the
entry); on loading, an entry that selects nothing is ignored, as in PEFT.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lora.base import AdapterLayer
from lora.config import LoraConfig
from lora.model import CONTAINERS
from lora.targets import find_modules_to_save, modules_outside_adapters

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Our parameter name -> its name in PEFT files.
TO_FILE = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# Sparse LoRA's masks: the factors are saved masked, so a reader that ignores the masks (PEFT) computes
# the same update even if the pruned entries of lora_A / lora_B have drifted since the last apply_masks_().
SPARSE_MASKS = {"lora_A": "mask_A", "lora_B": "mask_B"}


def _adapter_tensors(layer: AdapterLayer) -> dict[str, torch.Tensor]:
    """The layer's own tensors (not its base's), by their attribute names."""
    return {k: v for k, v in layer.state_dict(keep_vars=True).items() if not k.startswith("base_layer.")}


def file_key(module: str, name: str) -> str:
    return f"{PREFIX}{module}.{TO_FILE.get(name, name)}"


def tensor_plan(model: nn.Module, layers: list[tuple[str, AdapterLayer]], config: LoraConfig
                ) -> list[tuple[str, torch.Tensor]]:
    """(file key, tensor in the model) for everything an adapter file holds: the adapters' own
    tensors, trained biases (bias="lora_only": the adapted layers', "all": every `bias`, under
    PEFT's names, e.g. `<module>.base_layer.bias`), and the parameters of `modules_to_save`.

    `layers` may be adapters not yet installed (loading onto a fresh model): their names
    are then still plain layers in `model`, and their keys are as after installation."""
    plan = []
    for module, layer in layers:
        for name, tensor in _adapter_tensors(layer).items():
            plan.append((file_key(module, name), tensor))
    if config.bias != "none":
        adapted = dict(layers)
        for name, module in modules_outside_adapters(model):
            if name in adapted:
                bias, key = getattr(adapted[name].base_layer, "bias", None), f"{name}.base_layer.bias"
            elif config.bias == "all" and not isinstance(module, CONTAINERS):
                bias, key = module._parameters.get("bias"), f"{name}.bias" if name else "bias"
            else:
                continue
            if isinstance(bias, torch.Tensor):
                plan.append((PREFIX + key, bias))
    saved = find_modules_to_save(model, config.modules_to_save, strict=False, targets=[n for n, _ in layers])
    for module, sub in saved:
        for name, p in sub.named_parameters():
            plan.append((f"{PREFIX}{module}.{name}", p))
    unique = dict(plan)  # a key met twice (a saved module that is also a bias holder) is one tensor
    return list(unique.items())
