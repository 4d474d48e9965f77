"""Reading a Hugging Face checkpoint folder: where it is and what its files hold.

`resolve_source` turns a local folder or a hub id (fetched with huggingface_hub.snapshot_download
when online) into a folder; `weight_files` finds its weights (model.safetensors, pytorch_model.bin,
or the shards their *.index.json lists); `read_weights` reads them into one state dict and
`read_hf_config` reads config.json. A missing, empty, corrupt or malformed file fails with a
message naming the file (and, for JSON, the line and column). Nothing here knows a model:
the key maps that place these tensors are in trainers/checkpoint_keys.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer files


# ----------------------------------------------------------------------------- files

def resolve_source(source, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is; otherwise a hub id ("gpt2", "org/name") downloaded when online.

    allow_patterns: the hub files to fetch (default: config, weights and tokenizer files).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"checkpoint: expected a folder holding config.json and weights, got the file {str(path)!r}")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)) or str(source).startswith("."):
        raise FileNotFoundError(f"checkpoint: {str(source)!r} is neither a local folder nor a hub id")
    try:
        from huggingface_hub import snapshot_download
        if allow_patterns is not None:
            return Path(snapshot_download(repo_id=str(source), allow_patterns=allow_patterns))
        folder = Path(snapshot_download(repo_id=str(source), allow_patterns=HUB_PATTERNS))
        if not any((folder / name).exists() for name in WEIGHT_FILES):  # older repos ship only .bin
            folder = Path(snapshot_download(repo_id=str(source), allow_patterns=HUB_PATTERNS + ["pytorch_model*.bin"]))
        return folder
    except Exception as error:  # offline, unknown repo, no huggingface_hub, ...
        raise FileNotFoundError(f"checkpoint: {str(source)!r} is not a local folder, and fetching it from the "
                                f"Hugging Face hub failed ({type(error).__name__}: {error})") from error


def _read_one(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint: weights file {str(file)!r} not found")
    if file.stat().st_size == 0:
        raise ValueError(f"checkpoint: weights file {str(file)!r} is empty (0 bytes); it is corrupt or truncated")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            tensors = load_file(str(file))
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"checkpoint: cannot read weights file {str(file)!r}; it looks corrupt or truncated "
                         f"({type(error).__name__}: {error})") from error
    bad = [k for k, v in tensors.items() if not torch.is_tensor(v)] if isinstance(tensors, dict) else None
    if bad is None or bad:
        raise ValueError(f"checkpoint: {str(file)!r} does not hold a state dict of tensors"
                         + (f" (not a tensor: {bad[:5]})" if bad else f" (it holds a {type(tensors).__name__})"))
    return tensors


def _read_json(file: Path, what: str) -> dict:
    """A JSON object from `file`; ValueError naming the file, the line and the column otherwise."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint: {str(file)!r} is not valid JSON (line {error.lineno}, column "
                         f"{error.colno}: {error.msg})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"checkpoint: {str(file)!r} is not UTF-8 text (byte {error.start})") from None
    if not isinstance(value, dict):
        raise ValueError(f"checkpoint: {str(file)!r} must hold a JSON object ({what}), got {type(value).__name__}")
    return value


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: the first of WEIGHT_FILES found in folder, or the shards
    its *.index.json lists."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.exists():
            continue
        if name.endswith(".index.json"):
            weight_map = _read_json(file, "a shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError(f"checkpoint: {str(file)!r}: key 'weight_map' must map tensor names to shard "
                                 f"file names, got {weight_map!r:.80}")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"checkpoint: {str(file)!r} lists the shard {shard!r}, which is not in "
                                            f"{str(folder)!r}")
            return [folder / shard for shard in shards]
        return [file]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"checkpoint: no weights in {str(folder)!r}; expected one of {', '.join(WEIGHT_FILES)}, "
                            f"found {present or 'nothing'}")


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of the first weights file found in folder (shards are merged)."""
    tensors = {}
    for file in weight_files(folder):
        tensors.update(_read_one(file))
    return tensors


def read_hf_config(folder: Path) -> dict:
    file = Path(folder) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"checkpoint: no config.json in {str(folder)!r}")
    return _read_json(file, "the model configuration")
