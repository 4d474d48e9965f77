"""The from-scratch models: GPT-2, DistilBERT and LLaMA, each with its heads.

Every model answers `model(input_ids, targets=None, attention_mask=None) -> (logits, loss)`;
the causal ones also `generate(idx, max_new_tokens, temperature=1.0, top_k=None)`.
`build_model("gpt2-cls", GPT2Config.tiny(num_labels=3))` builds one by name.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from trainers.models.distilbert import (DistilBertConfig, DistilBertForQuestionAnswering,
                                        DistilBertForSequenceClassification, DistilBertModel)
from trainers.models.gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model
from trainers.models.llama import (LlamaConfig, LlamaForCausalLM, LlamaForQuestionAnswering,
                                   LlamaForSequenceClassification, LlamaModel)

# name -> (config class, model class). The first name of each family is its default head.
MODELS = {
    "gpt2": (GPT2Config, GPT2LMHeadModel),
    "gpt2-cls": (GPT2Config, GPT2ForSequenceClassification),
    "distilbert-cls": (DistilBertConfig, DistilBertForSequenceClassification),
    "distilbert-qa": (DistilBertConfig, DistilBertForQuestionAnswering),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "llama-cls": (LlamaConfig, LlamaForSequenceClassification),
    "llama-qa": (LlamaConfig, LlamaForQuestionAnswering),
}


def build_model(kind, config=None, **overrides) -> nn.Module:
    """A freshly initialised model.

    kind: one of MODELS ("gpt2", "gpt2-cls", "distilbert-cls", "distilbert-qa", "llama",
      "llama-cls", "llama-qa"),
      or a config instance, which builds that family's default head (LM for GPT-2 and
      LLaMA, classification for DistilBERT).
    config: a config of the matching class; None means the full-size default.
    overrides: config fields to replace, e.g. num_labels=4.
    """
    if dataclasses.is_dataclass(kind) and not isinstance(kind, type):
        if config is not None:
            raise ValueError("build_model: give the config either as `kind` or as `config`, not both")
        config = kind
        kind = next((name for name, (cfg_cls, _) in MODELS.items() if isinstance(config, cfg_cls)), None)
        if kind is None:
            raise TypeError(f"build_model: {type(config).__name__} is not the config of a known model; "
                            f"known models: {', '.join(MODELS)}")
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known models: {', '.join(MODELS)}")
    config_cls, model_cls = MODELS[kind]
    config = config_cls() if config is None else config
    if not isinstance(config, config_cls):
        raise TypeError(f"build_model({kind!r}): expected a {config_cls.__name__}, got {type(config).__name__}")
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return model_cls(config)


__all__ = [
    "MODELS", "build_model",
    "GPT2Config", "GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification",
    "DistilBertConfig", "DistilBertModel", "DistilBertForSequenceClassification", "DistilBertForQuestionAnswering",
    "LlamaConfig", "LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForQuestionAnswering",
]
