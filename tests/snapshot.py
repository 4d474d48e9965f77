"""Snapshots for all-or-nothing tests: "this call failed, so nothing changed".

Every public call that changes a model, a layer, a file or a folder must either
complete or leave everything exactly as it was. A test of that injects a failure
as late as possible and compares before with after:

    from tests.snapshot import assert_unchanged, snapshot

    before = snapshot(model)
    with pytest.raises(ValueError, match="..."):
        add_lora_to_model(model, ...)          # made to fail on the last layer
    assert_unchanged(before, model)

`snapshot(model)` records, by dotted name:
  * every parameter and buffer (tied/shared ones under each of their names): kind,
    dtype, shape, device and a copy of its bytes (so NaNs and -0.0 compare exactly),
    plus the bytes of its `.grad` if it has one;
  * the identity of each Parameter object (an optimizer holding the old object would
    silently stop training a replaced one) and which names share one object;
  * `requires_grad` of every parameter;
  * every module's type, `training` flag and its plain public attributes
    (bool/int/float/str/None: `merged`, `scaling`, `alpha`, `in_features`, ...).

`snapshot_files(folder)` records every file under a folder (relative path -> bytes);
`assert_files_unchanged(before, folder)` compares.

The models in tests are tiny, so copies are cheap; do not snapshot a large model.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

PLAIN = (bool, int, float, str, type(None))
MAX_SHOWN = 20   # differences listed in one assertion message


@dataclass(frozen=True)
class TensorRecord:
    kind: str                  # "parameter" or "buffer"
    dtype: torch.dtype
    shape: tuple
    device: str
    data: torch.Tensor         # a CPU copy of the bytes (uint8, flat)
    grad: torch.Tensor | None  # the same for .grad, None when there is no gradient
    requires_grad: bool
    identity: int              # id() of the tensor object


@dataclass(frozen=True)
class ModelSnapshot:
    tensors: dict              # name -> TensorRecord
    modules: dict              # name -> (type qualname, training, {attribute: value})


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 CPU copy of the tensor's values (exact: NaN payloads and -0.0 included)."""
    t = t.detach()
    if t.device.type == "meta":
        return torch.empty(0, dtype=torch.uint8)
    t = t.cpu().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8).clone() if t.numel() else torch.empty(0, dtype=torch.uint8)


def _record(kind: str, t: torch.Tensor) -> TensorRecord:
    grad = t.grad if t.is_leaf else None
    return TensorRecord(kind=kind, dtype=t.dtype, shape=tuple(t.shape), device=str(t.device),
                        data=_bytes(t), grad=None if grad is None else _bytes(grad),
                        requires_grad=bool(t.requires_grad), identity=id(t))


def _plain_attributes(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and type(v) in PLAIN}


def snapshot(model: nn.Module) -> ModelSnapshot:
    """A comparable record of `model`'s state (see the module docstring)."""
    tensors = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tensors[name] = _record("parameter", p)
    for name, b in model.named_buffers(remove_duplicate=False):
        tensors[name] = _record("buffer", b)
    modules = {name: (type(m).__qualname__, m.training, _plain_attributes(m))
               for name, m in model.named_modules(remove_duplicate=False)}
    return ModelSnapshot(tensors=tensors, modules=modules)


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _byte_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.numel() != b.numel():
        return f"{a.numel()} bytes before, {b.numel()} now"
    changed = (a != b).nonzero().flatten()
    return f"{changed.numel()} of {a.numel()} bytes differ (first at byte {int(changed[0])})"


def diff(before: ModelSnapshot, after: ModelSnapshot) -> list[str]:
    """Human-readable differences between two snapshots (empty when identical)."""
    out = []
    for name in sorted(before.modules.keys() - after.modules.keys()):
        out.append(f"module {name!r} ({before.modules[name][0]}) is gone")
    for name in sorted(after.modules.keys() - before.modules.keys()):
        out.append(f"module {name!r} ({after.modules[name][0]}) is new")
    for name in before.modules.keys() & after.modules.keys():
        (t0, tr0, at0), (t1, tr1, at1) = before.modules[name], after.modules[name]
        label = name or "<root>"
        if t0 != t1:
            out.append(f"module {label!r}: type {t0} -> {t1}")
        if tr0 != tr1:
            out.append(f"module {label!r}: training {tr0} -> {tr1}")
        for key in sorted(at0.keys() | at1.keys()):
            v0, v1 = at0.get(key, "<absent>"), at1.get(key, "<absent>")
            if not _same_value(v0, v1):
                out.append(f"module {label!r}: attribute {key} {v0!r} -> {v1!r}")
    for name in sorted(before.tensors.keys() - after.tensors.keys()):
        out.append(f"{before.tensors[name].kind} {name!r} is gone")
    for name in sorted(after.tensors.keys() - before.tensors.keys()):
        out.append(f"{after.tensors[name].kind} {name!r} is new")
    for name in sorted(before.tensors.keys() & after.tensors.keys()):
        a, b = before.tensors[name], after.tensors[name]
        for field in ("kind", "dtype", "shape", "device", "requires_grad"):
            if getattr(a, field) != getattr(b, field):
                out.append(f"{a.kind} {name!r}: {field} {getattr(a, field)} -> {getattr(b, field)}")
        if a.identity != b.identity:
            out.append(f"{a.kind} {name!r}: replaced by another tensor object")
        if a.shape == b.shape and a.dtype == b.dtype and not torch.equal(a.data, b.data):
            out.append(f"{a.kind} {name!r}: values changed ({_byte_diff(a.data, b.data)})")
        if (a.grad is None) != (b.grad is None):
            out.append(f"{a.kind} {name!r}: .grad {'set' if a.grad is None else 'cleared'}")
        elif a.grad is not None and not torch.equal(a.grad, b.grad):
            out.append(f"{a.kind} {name!r}: .grad changed ({_byte_diff(a.grad, b.grad)})")
    # Tied tensors must stay tied (and untied ones untied).
    groups0, groups1 = _sharing(before), _sharing(after)
    if groups0 != groups1:
        out.append(f"shared tensors differ: {sorted(groups0)} before, {sorted(groups1)} now")
    return out


def _sharing(snap: ModelSnapshot) -> set:
    by_id: dict[int, list[str]] = {}
    for name, rec in snap.tensors.items():
        by_id.setdefault(rec.identity, []).append(name)
    return {tuple(sorted(names)) for names in by_id.values() if len(names) > 1}


def assert_unchanged(before: ModelSnapshot, model: nn.Module | ModelSnapshot) -> None:
    """Fail, listing what changed, unless `model` (or its snapshot) matches `before` exactly."""
    after = model if isinstance(model, ModelSnapshot) else snapshot(model)
    problems = diff(before, after)
    if problems:
        shown = problems[:MAX_SHOWN]
        more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        raise AssertionError("the model changed:\n  " + "\n  ".join(shown) + more)


# --- folders ---------------------------------------------------------------------------------
def snapshot_files(folder) -> dict[str, bytes]:
    """{path relative to `folder`: file bytes} for every file below it ({} if it does not exist)."""
    root = Path(folder)
    if not root.exists():
        return {}
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def assert_files_unchanged(before: dict[str, bytes], folder) -> None:
    """Fail, naming the files, unless `folder` holds exactly the files (and bytes) of `before`."""
    after = snapshot_files(folder)
    problems = [f"{name} is gone" for name in sorted(before.keys() - after.keys())]
    problems += [f"{name} is new" for name in sorted(after.keys() - before.keys())]
    problems += [f"{name} changed ({len(before[name])} -> {len(after[name])} bytes)"
                 for name in sorted(before.keys() & after.keys()) if before[name] != after[name]]
    if problems:
        raise AssertionError(f"the folder {folder} changed:\n  " + "\n  ".join(problems[:MAX_SHOWN]))
