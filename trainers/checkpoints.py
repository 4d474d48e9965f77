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
"""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from trainers.models import MODELS, DistilBertConfig, GPT2Config, LlamaConfig

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


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of the first weights file found in folder (shards are merged)."""
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
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"checkpoint: {str(file)!r} lists the shard {shard!r}, which is not in "
                                            f"{str(folder)!r}")
                tensors.update(_read_one(folder / shard))
            return tensors
        return _read_one(file)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"checkpoint: no weights in {str(folder)!r}; expected one of {', '.join(WEIGHT_FILES)}, "
                            f"found {present or 'nothing'}")


def read_hf_config(folder: Path) -> dict:
    file = Path(folder) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"checkpoint: no config.json in {str(folder)!r}")
    return _read_json(file, "the model configuration")


# ----------------------------------------------------------------------------- configs

def _num_labels(hf: dict) -> int:
    return len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)


def config_from_hf(hf: dict):
    """(family, our config) from an HF config.json dict; unsupported variants fail by name."""
    model_type = hf.get("model_type")

    def require(key, ok, default=None):
        value = hf.get(key, default)
        if value not in ok:
            raise ValueError(f"checkpoint: {model_type} with {key}={value!r} is not supported (expected {ok})")

    if model_type == "gpt2":
        require("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        require("n_inner", (None, 4 * hf["n_embd"]))
        require("scale_attn_by_inverse_layer_idx", (False,), False)
        require("tie_word_embeddings", (True,), True)
        return "gpt2", GPT2Config(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                                  n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=hf.get("resid_pdrop", 0.0),
                                  layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                                  num_labels=_num_labels(hf), pad_token_id=hf.get("pad_token_id"))
    if model_type == "distilbert":
        require("activation", ("gelu",), "gelu")
        return "distilbert", DistilBertConfig(
            vocab_size=hf["vocab_size"], max_position_embeddings=hf["max_position_embeddings"], dim=hf["dim"],
            n_layers=hf["n_layers"], n_heads=hf["n_heads"], hidden_dim=hf["hidden_dim"], dropout=hf.get("dropout", 0.1),
            attention_dropout=hf.get("attention_dropout", 0.1), seq_classif_dropout=hf.get("seq_classif_dropout", 0.2),
            num_labels=_num_labels(hf), pad_token_id=hf.get("pad_token_id", 0))
    if model_type == "llama":
        rope = hf.get("rope_parameters") or {}
        if (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default" or \
                rope.get("rope_type", "default") != "default":
            raise ValueError("checkpoint: llama with rope scaling is not supported (only the default RoPE)")
        require("attention_bias", (False,), False)
        require("mlp_bias", (False,), False)
        require("hidden_act", ("silu",), "silu")
        require("head_dim", (None, hf["hidden_size"] // hf["num_attention_heads"]))
        return "llama", LlamaConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            hidden_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            num_labels=_num_labels(hf), pad_token_id=hf.get("pad_token_id"))
    raise ValueError(f"checkpoint: model_type {model_type!r} is not supported; known: gpt2, distilbert, llama")


# HF architecture -> our model name; base models and other heads get the family's default head.
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "GPT2ForSequenceClassification": "gpt2-cls",
    "DistilBertForSequenceClassification": "distilbert-cls", "DistilBertForQuestionAnswering": "distilbert-qa",
    "DistilBertModel": "distilbert-cls", "DistilBertForMaskedLM": "distilbert-cls",
    "LlamaForCausalLM": "llama", "LlamaModel": "llama", "LlamaForSequenceClassification": "llama-cls",
    "LlamaForQuestionAnswering": "llama-qa",
}


# ----------------------------------------------------------------------------- key maps
# Each map: our parameter name -> checkpoint key, after the checkpoint's base-model prefix
# ("transformer.", "distilbert.", "model.") has been stripped (HF saves base models without it).
# LLaMA has two: HF's LlamaForQuestionAnswering keeps its trunk under "transformer.", the
# other heads under "model.", and a base model loads into any head.

GPT2_BLOCK = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias"]
DISTILBERT_BLOCK = [f"attention.{n}_lin.{p}" for n in ("q", "k", "v", "out") for p in ("weight", "bias")] + \
                   [f"{n}.{p}" for n in ("sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm")
                    for p in ("weight", "bias")]
LLAMA_BLOCK = [f"self_attn.{n}_proj.weight" for n in "qkvo"] + \
              [f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")] + \
              ["input_layernorm.weight", "post_attention_layernorm.weight"]


@dataclass
class KeyMap:
    prefix: str  # base-model prefix in HF checkpoints
    names: dict[str, str]  # ours -> checkpoint key (prefix stripped)
    transpose: set[str] = field(default_factory=set)  # ours whose checkpoint tensor is (in, out)
    fresh_heads: tuple[str, ...] = ()  # our name prefixes that may be missing (new task heads)
    ignore: tuple[str, ...] = ()  # regexes of checkpoint keys to drop (buffers, other heads)
    other_prefixes: tuple[str, ...] = ()  # further base-model prefixes, stripped like `prefix`


def hf_key_map(family: str, config) -> KeyMap:
    if family == "gpt2":
        names = {f"transformer.{k}": k for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
        names.update({f"transformer.h.{i}.{k}": f"h.{i}.{k}" for i in range(config.n_layer) for k in GPT2_BLOCK})
        names.update({"lm_head.weight": "lm_head.weight", "score.weight": "score.weight"})
        transpose = {k for k in names if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))}  # Conv1D
        return KeyMap("transformer.", names, transpose, fresh_heads=("score.",),
                      ignore=(r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight", r"score\.weight"))
    if family == "distilbert":
        names = {f"distilbert.embeddings.{k}": f"embeddings.{k}"
                 for k in ("word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}
        names.update({f"distilbert.transformer.layer.{i}.{k}": f"transformer.layer.{i}.{k}"
                      for i in range(config.n_layers) for k in DISTILBERT_BLOCK})
        names.update({f"{h}.{p}": f"{h}.{p}" for h in ("pre_classifier", "classifier", "qa_outputs")
                      for p in ("weight", "bias")})
        return KeyMap("distilbert.", names, fresh_heads=("pre_classifier.", "classifier.", "qa_outputs."),
                      ignore=(r"embeddings\.position_ids", r"vocab_(transform|layer_norm|projector)\.\w+",
                              r"(pre_classifier|classifier|qa_outputs)\.\w+"))
    if family == "llama":
        trunk = ["embed_tokens.weight", "norm.weight"] + \
                [f"layers.{i}.{k}" for i in range(config.n_layers) for k in LLAMA_BLOCK]
        names = {f"{attr}.{k}": k for attr in ("model", "transformer") for k in trunk}  # LM/cls or QA trunk
        names.update({k: k for k in ("lm_head.weight", "score.weight", "qa_outputs.weight", "qa_outputs.bias")})
        # unused heads are dropped: a tied model reads lm_head from embed_tokens, a classifier
        # loaded from a causal LM has no lm_head (a missing lm_head still fails: it is no fresh head)
        ignore = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight", r"score\.weight",
                  r"qa_outputs\.\w+")
        return KeyMap("model.", names, fresh_heads=("score.", "qa_outputs."), ignore=ignore,
                      other_prefixes=("transformer.",))
    raise ValueError(f"no key map for model family {family!r}")


@dataclass
class LoadReport:
    loaded: list[str]  # our parameter names filled from the checkpoint
    initialised: list[str]  # new task-head parameters left at their fresh init
    ignored: list[str]  # checkpoint keys dropped on purpose (buffers, other heads)


def load_mapped(model: nn.Module, tensors: dict[str, Tensor], key_map: KeyMap) -> LoadReport:
    """Copy checkpoint tensors into model through key_map; fails naming every bad key."""
    prefixes = (key_map.prefix, *key_map.other_prefixes)
    tensors = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in tensors.items()}
    ours = dict(model.named_parameters())  # a tied weight appears once, under its first name
    missing, misshapen, fresh, plan = [], [], [], []
    for name, param in ours.items():
        source = key_map.names.get(name)
        assert source is not None, f"key map has no entry for the model parameter {name!r}"
        if source not in tensors:
            (fresh if name.startswith(key_map.fresh_heads) else missing).append(name)
            continue
        value = tensors[source].t() if name in key_map.transpose else tensors[source]
        if value.shape != param.shape:
            misshapen.append(f"{source}: checkpoint {tuple(value.shape)} vs model {name} {tuple(param.shape)}")
        plan.append((name, source, value))
    used = {source for _, source, _ in plan}
    unexpected = [k for k in tensors if k not in used]
    ignored = [k for k in unexpected if any(re.fullmatch(p, k) for p in key_map.ignore)]
    extra = [k for k in unexpected if k not in ignored]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected in the checkpoint: {', '.join(extra)}")
    if misshapen:
        problems.append(f"wrong shape: {'; '.join(misshapen)}")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + " | ".join(problems))
    with torch.no_grad():
        for name, _, value in plan:
            ours[name].copy_(value.to(ours[name].dtype))
    return LoadReport([name for name, _, _ in plan], fresh, ignored)


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
    config_cls, model_cls = MODELS[kind]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(f"load_hf_model: {config_cls.__name__} has no field(s) {sorted(unknown)}")
    config = dataclasses.replace(config, **overrides)
    model = model_cls(config)
    if dtype is not None:
        model.to(dtype)
    model.load_report = load_mapped(model, read_weights(folder), hf_key_map(family, config))
    return model.eval()


# ----------------------------------------------------------------------------- llama2.c

def permute_rotary(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a q/k projection from interleaved rotary pairs (2i, 2i+1) to rotate-half
    pairs (i, i + hs/2), head by head: the permutation HF applies to Meta's weights."""
    out_features, in_features = w.shape
    hs = out_features // n_heads
    return w.view(n_heads, hs // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def load_llama2c(path, kind: str = "llama", **overrides) -> nn.Module:
    """A llama2.c legacy (version 0) checkpoint: 7 int32 header, then float32 arrays.

    Header: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; vocab_size > 0
    means the classifier is tied to the token embedding, < 0 that a separate one follows.
    kind: "llama" (the language model), or "llama-cls" / "llama-qa": the trunk loaded under
      a fresh task head; overrides: config fields, e.g. num_labels=4.
    Returned in eval mode, like load_hf_model, with the load report on `model.load_report`.
    """
    if kind not in ("llama", "llama-cls", "llama-qa"):
        raise ValueError(f"load_llama2c: kind must be 'llama', 'llama-cls' or 'llama-qa', got {kind!r}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
    if unknown:
        raise ValueError(f"load_llama2c: LlamaConfig has no field(s) {sorted(unknown)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {str(path)!r} not found")
    raw = path.read_bytes()
    if raw[:4] == struct.pack("<I", 0x616B3432):  # the magic of llama2.c's versioned exports
        raise ValueError(f"{str(path)!r} is a versioned llama2.c export; only the legacy version-0 format is supported")
    if len(raw) < 28:
        raise ValueError(f"{str(path)!r} is {len(raw)} bytes, too short for a llama2.c header (28 bytes)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
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
    if len(raw) != expected:
        raise ValueError(f"{str(path)!r} is {len(raw)} bytes but its header implies {expected}: "
                         "the file is truncated or corrupt")
    arrays, offset = {}, 28
    for name, shape in shapes:
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(np.frombuffer(raw, dtype="<f4", count=count, offset=offset).copy()).view(shape)
        offset += 4 * count
    config = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                         hidden_dim=hidden, max_seq_len=seq_len, tie_word_embeddings=tied, norm_eps=1e-5)
    # the stored RoPE table must be the one our rope_theta gives (llama2.c always uses 10000)
    positions = torch.arange(seq_len, dtype=torch.float32)[:, None]
    angles = positions * (1.0 / config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    if not torch.allclose(arrays["freq_cis_real"], angles.cos(), atol=1e-4):
        raise ValueError(f"{str(path)!r}: its RoPE table does not match theta={config.rope_theta}")
    model = MODELS[kind][1](dataclasses.replace(config, **overrides))
    tensors = {"embed_tokens.weight": arrays["tok_embeddings"], "norm.weight": arrays["norm"]}
    if not tied:
        tensors["lm_head.weight"] = arrays["output"]
    for i in range(n_layers):
        layer = f"layers.{i}."
        tensors.update({
            layer + "self_attn.q_proj.weight": permute_rotary(arrays["wq"][i], n_heads),
            layer + "self_attn.k_proj.weight": permute_rotary(arrays["wk"][i], n_kv),
            layer + "self_attn.v_proj.weight": arrays["wv"][i], layer + "self_attn.o_proj.weight": arrays["wo"][i],
            layer + "mlp.gate_proj.weight": arrays["w1"][i], layer + "mlp.down_proj.weight": arrays["w2"][i],
            layer + "mlp.up_proj.weight": arrays["w3"][i], layer + "input_layernorm.weight": arrays["attention_norm"][i],
            layer + "post_attention_layernorm.weight": arrays["ffn_norm"][i]})
    model.load_report = load_mapped(model, tensors, hf_key_map("llama", config))
    return model.eval()
