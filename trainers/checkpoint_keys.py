"""From a Hugging Face config and state dict to our models: the config translation and the key maps.

`config_from_hf` reads an HF config.json dict into our config dataclass (unsupported variants
fail by name); `ARCHITECTURES` names the model an HF architecture becomes. A `KeyMap` says, for
each of our parameters, which checkpoint key fills it (and which are stored transposed,
which task heads may be fresh, which checkpoint keys are dropped on purpose). `match_keys`
checks a checkpoint's keys and shapes against a model before anything is read; `load_mapped`
copies the tensors in. Every bad key is named in one error, and nothing is copied until all fit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from trainers.models import DistilBertConfig, GPT2Config, LlamaConfig

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


def match_keys(model: nn.Module, shapes: dict[str, tuple], key_map: KeyMap, where: dict[str, str] | None = None,
               origin: str | None = None) -> tuple[dict[str, str], LoadReport]:
    """Which checkpoint key fills which parameter, from the keys and shapes alone (nothing read):
    ({our name: checkpoint key as in `shapes`}, the report). Fails naming every bad key, and for
    a checkpoint read from files, `where` each key is ("'key' in 'file'") and the `origin` folder or file."""
    where = where or {}
    prefixes = (key_map.prefix, *key_map.other_prefixes)
    stripped = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): k for k in shapes}
    ours = dict(model.named_parameters())  # a tied weight appears once, under its first name
    missing, misshapen, fresh, plan = [], [], [], {}
    for name, param in ours.items():
        source = key_map.names.get(name)
        assert source is not None, f"key map has no entry for the model parameter {name!r}"
        if source not in stripped:
            (fresh if name.startswith(key_map.fresh_heads) else missing).append(name)
            continue
        shape = tuple(shapes[stripped[source]])
        shape = shape[::-1] if name in key_map.transpose else shape
        if shape != tuple(param.shape):
            misshapen.append(f"{where.get(stripped[source], source)}: checkpoint {shape} vs model {name} "
                             f"{tuple(param.shape)}")
        plan[name] = stripped[source]
    used = {stripped[key_map.names[name]] for name in plan}
    unexpected = [k for k, original in stripped.items() if original not in used]
    ignored = [k for k in unexpected if any(re.fullmatch(p, k) for p in key_map.ignore)]
    extra = [k for k in unexpected if k not in ignored]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected in the checkpoint: {', '.join(where.get(stripped[k], k) for k in extra)}")
    if misshapen:
        problems.append(f"wrong shape: {'; '.join(misshapen)}")
    if problems:
        origin = f" {origin!r}" if origin else ""
        raise ValueError(f"checkpoint{origin} does not fit {type(model).__name__}: " + " | ".join(problems))
    return plan, LoadReport(list(plan), fresh, ignored)


def load_mapped(model: nn.Module, tensors: dict[str, Tensor], key_map: KeyMap) -> LoadReport:
    """Copy checkpoint tensors into model through key_map; fails naming every bad key."""
    plan, report = match_keys(model, {k: v.shape for k, v in tensors.items()}, key_map)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, key in plan.items():
            value = tensors[key].t() if name in key_map.transpose else tensors[key]
            ours[name].copy_(value.to(ours[name].dtype))
    return report
