"""Device and dtype, chosen once.

Everything else in the project takes its device from its inputs (`x.device`) or
from the model it is handed. Only trainers, benchmarks and tutorials decide where
to run, and they all decide here: CUDA first, then Apple MPS, then the CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = tuple(_DTYPES)


DEVICE_NAMES = "cpu, cuda, cuda:N or mps (none or 'auto': the best one present)"


def parse_device(name: str | None) -> torch.device | None:
    """The device `name` names, or None for the automatic choice; a ValueError (not torch's
    RuntimeError) for anything else, such as "tpu" or "meta". Availability is not checked."""
    if name in (None, "", "auto"):
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device: expected {DEVICE_NAMES}, got {name!r}")
    return device


def pick_device(name: str | None = None) -> torch.device:
    """`name` ("cuda", "mps", "cpu", "cuda:1") overrides; otherwise the best one present."""
    device = parse_device(name)
    if device is not None:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: asked for {name!r} but CUDA is not available here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device: asked for {name!r} but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {name!r}") from None


def pick_autocast_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The dtype matmuls run in under autocast: bf16 where the hardware has it,
    fp16 on older CUDA cards and on MPS, float32 on the CPU (CPU autocast to bf16
    is slower than fp32 on most laptops, so it is opt-in with name="bf16")."""
    if name not in (None, "", "auto"):
        return parse_dtype(name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@dataclass
class Runtime:
    """Where and how a run computes: the one object trainers pass around."""
    device: torch.device
    autocast_dtype: torch.dtype

    @classmethod
    def create(cls, device: str | None = None, dtype: str | None = None) -> "Runtime":
        dev = pick_device(device)
        return cls(dev, pick_autocast_dtype(dev, dtype))

    def autocast(self):
        """Context for forward passes; a no-op in float32."""
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        """Wait for queued kernels (needed before reading a clock on GPUs)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def needs_grad_scaler(self) -> bool:
        return self.device.type == "cuda" and self.autocast_dtype == torch.float16
