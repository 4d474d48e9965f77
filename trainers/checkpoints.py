"""Pretrained weights into the from-scratch models.

Two sources:
- Hugging Face checkpoints: a local folder with config.json and model.safetensors
  (or pytorch_model.bin, or their sharded *.index.json forms), or, when online, a hub id
  fetched with huggingface_hub.snapshot_download. `load_hf_model(source, kind=None)`.
- llama2.c checkpoints (legacy version-0 `.bin`, e.g. stories260K). `load_llama2c(path)`.

Every load goes through an explicit key map (our parameter name -> checkpoint key) with
a shape check per tensor. Nothing is copied until every key is accounted for: a missing,
unexpected or misshapen tensor fails with a message that names it. The only tensors
allowed to be absent are a freshly added task head (e.g. `classifier` when a base
DistilBERT is loaded for classification); the report lists them. Loaded models come
back in eval mode, as transformers' `from_pretrained` returns them.

This file holds the entry point for HF checkpoints (`load_hf_model`, `hf_model_spec`); the
parts live beside it and are re-exported here:
- trainers/checkpoint_files.py: finding and reading the folder's files (config.json, weights, shards)
- trainers/checkpoint_keys.py: HF config -> our config, the key maps, matching and copying tensors
- trainers/llama2c.py: the llama2.c format (`load_llama2c`, `llama2c_tensors`, `permute_rotary`)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from trainers.checkpoint_files import (HUB_PATTERNS, WEIGHT_FILES, read_hf_config, read_weights, resolve_source,
                                       weight_files)
from trainers.checkpoint_keys import (ARCHITECTURES, KeyMap, LoadReport, config_from_hf, hf_key_map, load_mapped,
                                      match_keys)
from trainers.llama2c import check_llama2c_kind, llama2c_tensors, load_llama2c, permute_rotary
from trainers.models import MODELS

__all__ = ["load_hf_model", "hf_model_spec", "HUB_PATTERNS", "WEIGHT_FILES", "read_hf_config", "read_weights",
           "resolve_source", "weight_files", "ARCHITECTURES", "KeyMap", "LoadReport", "config_from_hf", "hf_key_map",
           "load_mapped", "match_keys", "check_llama2c_kind", "llama2c_tensors", "load_llama2c", "permute_rotary"]


def load_hf_model(source, kind: str | None = None, dtype: torch.dtype | None = None,
                  **overrides) -> nn.Module:
    """Build one of our models from an HF checkpoint (local folder or hub id).

    kind: one of trainers.models.MODELS; by default taken from the checkpoint's
      `architectures` (a base or MLM DistilBERT becomes "distilbert-cls").
    overrides: config fields to change, e.g. num_labels=4, dropout=0.0.
    The model comes back in eval mode, as transformers' `from_pretrained` returns it
    (dropout off, so a loaded model scores deterministically); train() switches it to
    training mode itself. The report of the load is kept on `model.load_report`.
    """
    folder, family, kind, config = hf_model_spec(source, kind, overrides)
    model = MODELS[kind][1](config)
    if dtype is not None:
        model.to(dtype)
    model.load_report = load_mapped(model, read_weights(folder), hf_key_map(family, config))
    return model.eval()


def hf_model_spec(source, kind: str | None, overrides: dict, caller: str = "load_hf_model"):
    """(folder, family, kind, config) of a checkpoint: its config.json, the model `kind` (default:
    from `architectures`) and the config with `overrides` applied; nothing built or read yet."""
    folder = resolve_source(source)
    hf = read_hf_config(folder)
    try:
        family, config = config_from_hf(hf)
    except KeyError as error:       # a field config_from_hf needs (n_embd, hidden_size, ...)
        raise ValueError(f"checkpoint: {str(folder / 'config.json')!r} lacks the key {error.args[0]!r}, "
                         f"needed for model_type {hf.get('model_type')!r}") from None
    if kind is None:
        kind = next((ARCHITECTURES[a] for a in hf.get("architectures") or [] if a in ARCHITECTURES), family)
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known models: {', '.join(MODELS)}")
    if not kind.startswith(family):
        raise ValueError(f"checkpoint {str(source)!r} holds a {family} model, cannot load it as {kind!r}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"{caller}: {MODELS[kind][0].__name__} has no field(s) {sorted(unknown)}")
    return folder, family, kind, dataclasses.replace(config, **overrides)
