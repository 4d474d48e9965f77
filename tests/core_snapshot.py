"""Stand-in for tests/snapshot.py (being written on another branch): record a model's tensors
(bytes, identity, requires_grad), module types and plain attributes, and assert nothing changed."""
from __future__ import annotations

import torch
import torch.nn as nn

PLAIN = (bool, int, float, str, type(None))


def snapshot(model: nn.Module) -> dict:
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        tensors[name] = (t.dtype, tuple(t.shape), t.detach().cpu().clone().view(-1).view(torch.uint8)
                         if t.numel() else None, id(t), getattr(t, "requires_grad", False))
    modules = {name: (type(m).__qualname__, m.training,
                      {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, PLAIN)})
               for name, m in model.named_modules()}
    return {"tensors": tensors, "modules": modules}


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert before["modules"] == after["modules"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (dtype, shape, data, ident, flag) in before["tensors"].items():
        dtype2, shape2, data2, ident2, flag2 = after["tensors"][name]
        assert (dtype, shape, ident, flag) == (dtype2, shape2, ident2, flag2), name
        assert (data is None and data2 is None) or torch.equal(data, data2), name
