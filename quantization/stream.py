"""Fill a model skeleton from a checkpoint one tensor at a time, quantizing as it reads.

quantize_model(load(...)) holds the whole float model first: 4 bytes per parameter in
float32, before NF4 brings the quantized layers down to about half a byte (4.127 bits with
double quantization).  Here the model is built on the meta device (every shape, no storage)
and each tensor is read, quantized if its layer is to be quantized, and let go:

    peak memory ≈ quantized model + one float tensor (+ the scratch its quantization needs)

The result is the one quantize_model gives on the loaded model, bit for bit: the same plan
(plan_quantization on the skeleton, so the same names, skip rules and tied weights left in
float) and the same Linear4bit/Linear8bit.from_linear on the same float weight, read, cast
to the skeleton's dtype and moved to `device` as the float load would have done.

The skeleton is any module whose parameters are on the meta device, e.g.
`with torch.device("meta"): model = LlamaForCausalLM(config)`; parameters that already hold
values (a freshly initialised task head) are kept unless the checkpoint gives them.  Buffers
are not read from the checkpoint, so they must hold values.  `tensors` maps each parameter
name (as `named_parameters()` gives it: a tied weight under its first name) to a LazyTensor;
the caller owns the key map (checkpoint key -> parameter name) and any per-tensor transform
(a transpose, a rotary permutation), both of which go inside `read`.
trainers/quantized_load.py does this for HF folders and llama2.c files.

All-or-nothing: every name and shape is checked from the file headers before the first read,
and the new layers and parameters are built aside and swapped into the skeleton at the end.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .layers import is_conv1d
from .model import plan_quantization, quantize_layer, replace_module, resolve_bits, warn_left_in_float


@dataclass(frozen=True)
class LazyTensor:
    """A tensor that is read only when asked for: its shape is known from a header."""
    shape: tuple[int, ...]                 # the shape read() returns
    read: Callable[[], torch.Tensor]
    where: str                             # "'key' in 'file'", for error messages

    def then(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | None = None) -> "LazyTensor":
        """The same tensor passed through fn (e.g. a transpose) when read; shape: fn's output shape."""
        read = self.read
        return LazyTensor(tuple(self.shape if shape is None else shape), lambda: fn(read()), self.where)


# ---------------------------------------------------------------------------------------------
# safetensors files, read with plain reads.
#
# safetensors' own safe_open maps the file into memory; every page a read touches counts in the
# process's resident memory until the file is closed, so reading a 400 MB file through one
# safe_open raised peak RSS by 387 MB (measured), not by the one 100 MB tensor held at a time.
# The format is simple (8-byte little-endian header length, a JSON header giving each tensor's
# dtype, shape and byte range, then the bytes), so each tensor is read straight into its own
# freshly allocated storage: nothing else stays resident.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _header(file: str) -> tuple[dict, int]:
    """(the JSON header without __metadata__, byte offset where the data starts)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"safetensors file {file!r} is {size} bytes, too short for a header")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise ValueError(f"safetensors file {file!r}: header length {n} runs past the end of the file "
                             f"({size} bytes); it is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"safetensors file {file!r}: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"safetensors file {file!r}: its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def _reader(file: str, start: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy()            # the tensor's own bytes
        with open(file, "rb") as f:
            f.seek(start)
            got = f.readinto(buffer)
        if got != buffer.nbytes:
            raise ValueError(f"read {got} of {buffer.nbytes} bytes: the file is truncated")
        return out
    return read


def safetensors_tensors(files: list[str | os.PathLike]) -> dict[str, LazyTensor]:
    """Every tensor of one or more .safetensors files (e.g. the shards of a checkpoint),
    unread: {key: LazyTensor}.  Only the headers are read here; they are checked (dtype,
    byte range inside the file, no key in two files), naming the file and key."""
    tensors: dict[str, LazyTensor] = {}
    for file in map(str, files):
        header, data_start = _header(file)
        size = os.path.getsize(file)
        for key, info in header.items():
            where = f"{key!r} in {file!r}"
            try:
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), tuple(info["shape"]), \
                    info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"safetensors header entry {where} is malformed: {info!r:.120}") from None
            if dtype is None:
                raise ValueError(f"{where} has dtype {info['dtype']!r}; readable: {sorted(SAFETENSORS_DTYPES)}")
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if end - begin != nbytes or begin < 0 or data_start + end > size:
                raise ValueError(f"{where}: bytes {begin}..{end} do not hold a {info['dtype']} tensor of shape "
                                 f"{list(shape)} ({nbytes} bytes) inside the file ({size} bytes)")
            if key in tensors:
                raise ValueError(f"checkpoint key {key!r} is in two files: {tensors[key].where} and {file!r}")
            tensors[key] = LazyTensor(shape, _reader(file, data_start + begin, dtype, shape), where)
    return tensors


# ---------------------------------------------------------------------------------------------
# Filling the skeleton.


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where there is none (macOS, musl, Windows).

    Each layer frees its float weight and quantization scratch (several MiB) but keeps its packed
    codes, allocated meanwhile (a few hundred KiB): glibc's heap keeps the freed holes resident.
    On the 349M-parameter benchmark model (trainers/bench/load.py) the load's RSS rose by 548 MiB
    for a model holding 389 MiB (0.41 of the 1330 MiB checkpoint); trimming after each layer gives
    the holes back to the system: +410 MiB (0.31), for 1.2 s of a 41 s load (measured)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return lambda: None
    return lambda: trim(0) and None


RELEASE_FREED_MEMORY = _malloc_trim()


def _check(skeleton: nn.Module, params: dict[str, nn.Parameter], tensors: dict[str, LazyTensor]) -> None:
    """Every problem at once, before anything is read."""
    problems = []
    unknown = [name for name in tensors if name not in params]
    missing = [name for name, p in params.items() if p.is_meta and name not in tensors]
    misshapen = [f"{tensors[name].where}: checkpoint {tensors[name].shape} vs model {name} {tuple(p.shape)}"
                 for name, p in params.items() if name in tensors and tuple(tensors[name].shape) != tuple(p.shape)]
    empty_buffers = [name for name, b in skeleton.named_buffers() if b.is_meta]
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if unknown:
        problems.append(f"no such parameter in {type(skeleton).__name__}: {', '.join(unknown)}")
    if misshapen:
        problems.append(f"wrong shape: {'; '.join(misshapen)}")
    if empty_buffers:
        problems.append(f"buffers on the meta device (a skeleton's buffers must hold values): "
                        f"{', '.join(empty_buffers)}")
    if problems:
        raise ValueError(f"fill_quantized: checkpoint does not fit {type(skeleton).__name__}: " + " | ".join(problems))


def _value(name: str, param: nn.Parameter, tensors: dict[str, LazyTensor], device: torch.device) -> torch.Tensor:
    """The parameter's value: read from the checkpoint (cast to the skeleton's dtype on the CPU,
    as the float load does, then moved to device), or the value it already holds."""
    if name not in tensors:
        return param.detach().to(device)
    entry = tensors[name]
    try:
        value = entry.read()
    except Exception as error:
        raise ValueError(f"fill_quantized: cannot read {entry.where} (for {name}): "
                         f"{type(error).__name__}: {error}") from error
    if tuple(value.shape) != tuple(entry.shape):
        raise ValueError(f"fill_quantized: {entry.where} read as shape {tuple(value.shape)}, "
                         f"its header says {tuple(entry.shape)}")
    return value.to(param.dtype).to(device).contiguous()


def _quantized(name: str, module: nn.Module, bits: int, weight: torch.Tensor, bias: torch.Tensor | None,
               compute_dtype, blocksize: int, double_quant: bool, where: str) -> nn.Module:
    """Linear4bit/Linear8bit.from_linear on a stand-in nn.Linear holding the read weight: the
    very code quantize_model runs, so the same bits come out."""
    w = weight.t() if is_conv1d(module) else weight                 # (out, in)
    stand_in = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    stand_in.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        stand_in.bias = nn.Parameter(bias, requires_grad=False)
    layer = quantize_layer(stand_in, bits, compute_dtype=compute_dtype, blocksize=blocksize,
                           double_quant=double_quant, who=f"fill_quantized: layer {name!r} ({where})")
    return layer.to(weight.device)


def fill_quantized(skeleton: nn.Module, tensors: dict[str, LazyTensor], bits: int | dict[str, int] | None = None,
                   skip: list[str] | tuple[str, ...] = (), compute_dtype: torch.dtype | None = None,
                   blocksize: int = 64, double_quant: bool = True, *, method: str | None = None,
                   include_head: bool = False, device: str | torch.device | None = None) -> nn.Module:
    """Fill `skeleton` (parameters on the meta device) from `tensors`, quantizing as quantize_model
    would; in place, returns the skeleton.  See the module docstring.

    bits, skip, compute_dtype, blocksize, double_quant, method, include_head: as in quantize_model
      (heads and tied weights stay float unless include_head; a warning names what stays float).
    device: where the parameters and quantized layers go (default: the CPU); each float
      weight is moved there before it is quantized, as quantize_model on a model on `device`.
    """
    device = torch.device("cpu" if device is None else device)
    left: list[str] = []
    plan = plan_quantization(skeleton, resolve_bits(bits, method, "fill_quantized"), skip, include_head, left)
    params = dict(skeleton.named_parameters())           # a tied weight once, under its first name
    _check(skeleton, params, tensors)

    layers = {}
    for name, b in plan.items():                          # one float weight alive at a time
        module = skeleton.get_submodule(name)
        weight = _value(f"{name}.weight", params[f"{name}.weight"], tensors, device)
        bias = None if module.bias is None else _value(f"{name}.bias", params[f"{name}.bias"], tensors, device)
        where = tensors[f"{name}.weight"].where if f"{name}.weight" in tensors else "already in the skeleton"
        layers[name] = _quantized(name, module, b, weight, bias, compute_dtype, blocksize, double_quant, where)
        del weight, bias
        RELEASE_FREED_MEMORY()
    quantized_params = {f"{name}.{p}" for name in plan for p in ("weight", "bias")}
    floats = {id(p): nn.Parameter(_value(name, p, tensors, device), requires_grad=p.requires_grad)
              for name, p in params.items() if name not in quantized_params}
    buffers = {id(b): b.to(device) for b in skeleton.buffers()}

    # Swap: every module holding an old parameter (tied ones included) gets the new one.
    for module in skeleton.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) in floats:
                module._parameters[key] = floats[id(p)]
        for key, b in module._buffers.items():
            if b is not None and id(b) in buffers:
                module._buffers[key] = buffers[id(b)]
    for name, layer in layers.items():
        replace_module(skeleton, name, layer)
    warn_left_in_float(skeleton, left, "fill_quantized")
    return skeleton
