"""load_quantized_model: a pretrained model quantized while it is read, never whole in float.

    model = load_quantized_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0", bits=4, device="cuda")

is quantize_model(load_hf_model(name).to(device), bits=4), bit for bit, without the float
model: the model is built on the meta device from the checkpoint's config.json (shapes, no
storage), the checkpoint keys are matched to its parameters through the same key map
load_hf_model uses (trainers.checkpoints.match_keys), and quantization.stream.fill_quantized
reads the tensors one at a time, quantizing each Linear weight as it arrives.  Peak memory is
the quantized model plus about one float tensor (measured in trainers/bench/load.py).

Sources: an HF folder or hub id holding model.safetensors or a sharded
model.safetensors.index.json (pytorch_model.bin is refused: torch.load unpickles it whole),
or a llama2.c legacy file (e.g. stories260K.bin), as load_llama2c reads it.
A base checkpoint loaded under a task head (kind="llama-cls", ...) gets a fresh head,
initialised N(0, 0.02) with zero bias as every model here initialises its heads; it is random
either way, so only it differs from the float load.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from quantization.stream import LazyTensor, fill_quantized, safetensors_tensors
from trainers.checkpoint_files import weight_files
from trainers.checkpoint_keys import hf_key_map, match_keys
from trainers.checkpoints import hf_model_spec
from trainers.llama2c import check_llama2c_kind, llama2c_tensors
from trainers.models import MODELS


def lazy_weights(folder: Path) -> dict[str, LazyTensor]:
    """The checkpoint's tensors, unread (safetensors only: a .bin must be unpickled whole)."""
    files = weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        raise ValueError(f"load_quantized_model: {str(files[0])!r} is a pickled PyTorch file, which can only be "
                         "read whole; streaming needs safetensors. Use quantize_model(load_hf_model(...)), or "
                         "convert the checkpoint to safetensors")
    return safetensors_tensors(files)


@contextlib.contextmanager
def _init_skipped():
    """nn.init's fills do nothing while the skeleton is built: on the meta device there is nothing
    to fill, yet the first normal_ there imports torch's meta decompositions (sympy and more),
    which cost ~70 MB of RSS and ~3 s (measured; a third of the 0.35 budget on the 350M
    benchmark model). transformers' no_init_weights does the same."""
    names = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_", "kaiming_uniform_",
             "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _init_fresh_heads(model: nn.Module, names: list[str]) -> None:
    """Give the fresh head parameters values (they are on the meta device): N(0, 0.02), zero bias."""
    for module_name in sorted({name.rpartition(".")[0] for name in names}):
        module = model.get_submodule(module_name)
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            for key, p in module.named_parameters(recurse=False):
                p.zero_() if key == "bias" else p.normal_(0.0, 0.02)


def load_quantized_model(name_or_path, bits: int | dict[str, int] | None = None,
                         device: str | torch.device | None = None, *, method: str | None = None,
                         include_head: bool = False, skip: list[str] | tuple[str, ...] = (),
                         compute_dtype: torch.dtype | None = None, blocksize: int = 64, double_quant: bool = True,
                         kind: str | None = None, dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """A pretrained model with its Linear layers quantized as they are read (see the module docstring).

    name_or_path: an HF folder or hub id (as load_hf_model), or a llama2.c .bin file.
    bits, method, include_head, skip, compute_dtype, blocksize, double_quant: as in quantize_model
      (bits 4, 8 or {pattern: bits}; default NF4; heads and tied weights stay float).
    device: where the model is built (default: the CPU); each weight is quantized there.
    kind, dtype, overrides: as in load_hf_model (llama2.c files: kind "llama", "llama-cls" or "llama-qa").
    Returned in eval mode, with the load report on `model.load_report`, like load_hf_model.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():                                       # a llama2.c file
        kind = kind or "llama"
        check_llama2c_kind(kind, overrides, "load_quantized_model")
        file_config, tensors = llama2c_tensors(path)
        origin = path
        config = dataclasses.replace(file_config, **overrides)
        key_map = hf_key_map("llama", file_config)
    else:
        folder, family, kind, config = hf_model_spec(name_or_path, kind, overrides, "load_quantized_model")
        tensors, origin = lazy_weights(folder), folder
        key_map = hf_key_map(family, config)
    with torch.device("meta"), _init_skipped():
        model = MODELS[kind][1](config)                      # every shape, no storage
    if dtype is not None:
        model.to(dtype)
    plan, report = match_keys(model, {k: t.shape for k, t in tensors.items()}, key_map,
                              {k: t.where for k, t in tensors.items()}, str(origin))
    _init_fresh_heads(model, report.initialised)
    by_param = {}
    for name, key in plan.items():
        entry = tensors[key]
        by_param[name] = entry.then(torch.t, entry.shape[::-1]) if name in key_map.transpose else entry
    fill_quantized(model, by_param, bits, skip, compute_dtype, blocksize, double_quant, method=method,
                   include_head=include_head, device=device)
    model.load_report = report
    return model.eval()
