"""llama2.c checkpoints (legacy version-0 `.bin`, e.g. stories260K) into our LLaMA.

The file is a 7-int header and float32 arrays (layout in `llama2c_tensors`). Its q and k rows
hold rotary pairs interleaved, Meta's convention; ours (and HF's) rotate halves, so
`permute_rotary` reorders them on reading. The tensors then go through the same key map and
shape checks as a Hugging Face LLaMA (trainers/checkpoint_keys.py).
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from quantization.stream import LazyTensor
from trainers.checkpoint_keys import hf_key_map, load_mapped
from trainers.models import MODELS, LlamaConfig

def permute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a q/k projection from interleaved rotary pairs (2i, 2i+1) to rotate-half
    pairs (i, i + hs/2), head by head: the permutation HF applies to Meta's weights."""
    out_features, in_features = w.shape
    hs = out_features // n_heads
    return w.view(n_heads, hs // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def check_llama2c_kind(kind: str, overrides: dict, caller: str = "load_llama2c") -> None:
    if kind not in ("llama", "llama-cls", "llama-qa"):
        raise ValueError(f"{caller}: kind must be 'llama', 'llama-cls' or 'llama-qa', got {kind!r}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
    if unknown:
        raise ValueError(f"{caller}: LlamaConfig has no field(s) {sorted(unknown)}")


def load_llama2c(path, kind: str = "llama", **overrides) -> nn.Module:
    """A llama2.c legacy (version 0) checkpoint (see llama2c_tensors for the format).

    kind: "llama" (the language model), or "llama-cls" / "llama-qa": the trunk loaded under
      a fresh task head; overrides: config fields, e.g. num_labels=4.
    Returned in eval mode, like load_hf_model, with the load report on `model.load_report`.
    """
    check_llama2c_kind(kind, overrides)
    config, tensors = llama2c_tensors(path)
    model = MODELS[kind][1](dataclasses.replace(config, **overrides))
    model.load_report = load_mapped(model, {k: t.read() for k, t in tensors.items()}, hf_key_map("llama", config))
    return model.eval()


def llama2c_tensors(path) -> tuple[LlamaConfig, dict[str, LazyTensor]]:
    """The config of a llama2.c legacy (version 0) file, and its tensors, unread, under the
    checkpoint keys hf_key_map("llama") knows (q and k rows permuted to rotate-half on reading).

    Layout: 7 int32 header, then float32 arrays, each stacked over the layers.  Header: dim,
    hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; vocab_size > 0 means the
    classifier is tied to the token embedding, < 0 that a separate one follows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {str(path)!r} not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(28)
    if head[:4] == struct.pack("<I", 0x616B3432):  # the magic of llama2.c's versioned exports
        raise ValueError(f"{str(path)!r} is a versioned llama2.c export; only the legacy version-0 format is supported")
    if size < 28:
        raise ValueError(f"{str(path)!r} is {size} bytes, too short for a llama2.c header (28 bytes)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head)
    tied, vocab = vocab > 0, abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise ValueError(f"{str(path)!r}: header {(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)} "
                         "is not a valid llama2.c header; the file is corrupt or not a llama2.c checkpoint")
    hs = dim // n_heads
    shapes = [("tok_embeddings", (vocab, dim)), ("attention_norm", (n_layers, dim)),
              ("wq", (n_layers, dim, dim)), ("wk", (n_layers, n_kv * hs, dim)), ("wv", (n_layers, n_kv * hs, dim)),
              ("wo", (n_layers, dim, dim)), ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
              ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)), ("norm", (dim,)),
              ("freq_cis_real", (seq_len, hs // 2)), ("freq_cis_imag", (seq_len, hs // 2))]
    if not tied:
        shapes.append(("output", (vocab, dim)))
    expected = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size != expected:
        raise ValueError(f"{str(path)!r} is {size} bytes but its header implies {expected}: "
                         "the file is truncated or corrupt")
    offsets, offset = {}, 28
    for name, shape in shapes:
        offsets[name] = offset
        offset += 4 * int(np.prod(shape))
    layout = dict(shapes)

    def array(name: str, layer: int | None = None, rotary_heads: int | None = None) -> LazyTensor:
        """The float32 array `name` (one layer's slice of it, if `layer` is given), read on demand."""
        shape = layout[name] if layer is None else layout[name][1:]
        count = int(np.prod(shape))
        start = offsets[name] + (0 if layer is None else 4 * count * layer)

        def read() -> Tensor:
            w = torch.from_numpy(np.fromfile(path, dtype="<f4", count=count, offset=start)).view(shape)
            return w if rotary_heads is None else permute_rotary(w, rotary_heads)
        where = f"{name}{'' if layer is None else f'[{layer}]'} in {str(path)!r}"
        return LazyTensor(tuple(shape), read, where)

    config = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                         hidden_dim=hidden, max_seq_len=seq_len, tie_word_embeddings=tied, norm_eps=1e-5)
    # the stored RoPE table must be the one our rope_theta gives (llama2.c always uses 10000)
    positions = torch.arange(seq_len, dtype=torch.float32)[:, None]
    angles = positions * (1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    if not torch.allclose(array("freq_cis_real").read(), angles.cos(), atol=1e-4):
        raise ValueError(f"{str(path)!r}: its RoPE table does not match theta={config.rope_theta}")
    tensors = {"embed_tokens.weight": array("tok_embeddings"), "norm.weight": array("norm")}
    if not tied:
        tensors["lm_head.weight"] = array("output")
    for i in range(n_layers):
        layer = f"layers.{i}."
        tensors.update({
            layer + "self_attn.q_proj.weight": array("wq", i, n_heads),
            layer + "self_attn.k_proj.weight": array("wk", i, n_kv),
            layer + "self_attn.v_proj.weight": array("wv", i), layer + "self_attn.o_proj.weight": array("wo", i),
            layer + "mlp.gate_proj.weight": array("w1", i), layer + "mlp.down_proj.weight": array("w2", i),
            layer + "mlp.up_proj.weight": array("w3", i), layer + "input_layernorm.weight": array("attention_norm", i),
            layer + "post_attention_layernorm.weight": array("ffn_norm", i)})
    return config, tensors
