"""Checks on the fields of the configuration dataclasses, run by their `__post_init__`.

TrainConfig, RunSettings, PlantedConfig and AblationSettings check each field when they
are built, so the library and the command line (which builds them from its flags) refuse
the same values, and refuse them before any folder is made or any model is loaded. A
bad value is a ValueError that names the field, its flag, what was expected and what
was given:

    TrainConfig.lr (--lr): expected a finite number >= 0, got nan

NaN needs its own check: every comparison with it is False, so `clip < 0` lets a NaN
clip through and `clip > 0` then quietly switches clipping off.
"""
from __future__ import annotations

import math
import numbers


def _fail(obj, name: str, expected: str) -> None:
    flag = "--" + name.replace("_", "-")
    raise ValueError(f"{type(obj).__name__}.{name} ({flag}): expected {expected}, got {getattr(obj, name)!r}")


def check_ints(obj, names, *, minimum: int, optional: bool = False) -> None:
    """Each field is an integer >= minimum (or None when optional)."""
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            _fail(obj, name, f"an integer >= {minimum}" + (" or None" if optional else ""))


def check_floats(obj, names, *, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None, optional: bool = False) -> None:
    """Each field is a finite real number within the bounds (`above` is a strict lower bound)."""
    bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {maximum:g}" if maximum is not None else ""]
    expected = " and ".join(b for b in bounds if b)
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
              and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
              and (above is None or value > above))
        if not ok:
            _fail(obj, name, "a finite number" + (f" {expected}" if expected else "")
                  + (" or None" if optional else ""))


def check_choice(obj, name: str, choices) -> None:
    if getattr(obj, name) not in choices:
        _fail(obj, name, f"one of {', '.join(map(repr, choices))}")


def check_device(obj, name: str = "device") -> None:
    """The field names a device the trainers know (whether it is present here is checked
    when a run starts: a config may be written on one machine and run on another)."""
    from trainers.device import DEVICE_NAMES, parse_device
    try:
        parse_device(getattr(obj, name))
    except ValueError:
        _fail(obj, name, DEVICE_NAMES)


def check_dtype(obj, name: str = "dtype") -> None:
    import torch
    from trainers.device import DTYPE_NAMES
    value = getattr(obj, name)
    if not isinstance(value, torch.dtype) and value not in (None, "", "auto", *DTYPE_NAMES):
        _fail(obj, name, f"one of {', '.join(DTYPE_NAMES)} (none: the device's default)")
