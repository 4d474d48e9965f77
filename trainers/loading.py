"""Models and tasks by name: `load_model("gpt2-tiny", "sst2")`, `load_task_for("sst2", tokenizer)`.

A model name is a from-scratch preset (a tiny GPT-2, DistilBERT or LLaMA built seeded, with
a byte-level BPE tokenizer trained on the task's own text), a llama2.c checkpoint from the
data folder (stories260K), a local Hugging Face checkpoint folder, or a hub id. The task
decides the head (`model_kind`): a classifier, a span head, or the LM head.
"""
from __future__ import annotations

import torch

from trainers import models
from trainers.checkpoint_files import read_hf_config, resolve_source
from trainers.checkpoint_keys import config_from_hf
from trainers.checkpoints import load_hf_model
from trainers.llama2c import load_llama2c
from trainers.data import get_task, load_task, read_raw
from trainers.paths import data_file
from trainers.tokenization import Llama2cTokenizer, load_tokenizer, train_bpe_tokenizer

# From-scratch presets: (family, config overrides); the tokenizer is a byte-level BPE
# trained on the task's training text (trainers.tokenization.train_bpe_tokenizer).
MODEL_PRESETS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=32)),
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128)),
    "distilbert-tiny": ("distilbert", dict(n_layers=2, n_heads=2, dim=32, hidden_dim=64)),
    "llama-tiny": ("llama", dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)),
}
LLAMA2C_MODELS = {"stories260K": ("stories260K", "stories260K.bin", "tok512.bin")}
MODEL_HELP = (f"a from-scratch preset ({', '.join(MODEL_PRESETS)}), {', '.join(LLAMA2C_MODELS)} "
              f"(llama2.c, from the data folder), a local Hugging Face checkpoint folder, or a hub id")


def model_kind(family: str, task_kind: str) -> str:
    """The trainers.models head a task needs, for a family."""
    kinds = {("gpt2", "classification"): "gpt2-cls", ("gpt2", "pair_classification"): "gpt2-cls",
             ("gpt2", "lm"): "gpt2", ("gpt2", "summarization"): "gpt2",
             ("distilbert", "classification"): "distilbert-cls",
             ("distilbert", "pair_classification"): "distilbert-cls", ("distilbert", "qa"): "distilbert-qa",
             ("llama", "lm"): "llama", ("llama", "summarization"): "llama",
             ("llama", "classification"): "llama-cls", ("llama", "pair_classification"): "llama-cls",
             ("llama", "qa"): "llama-qa"}
    if (family, task_kind) not in kinds:
        fits = sorted({f for f, k in kinds if k == task_kind})
        raise ValueError(f"a {family} model has no head for a {task_kind} task; families that do: {fits}")
    return kinds[(family, task_kind)]


def _task_texts(name: str, data_dir=None, seed: int = 0, limit: int = 5000) -> list[str]:
    texts = []
    for record in read_raw(name, data_dir=data_dir, seed=seed).train[:limit]:
        texts += [record[k] for k in ("text", "text_pair", "summary", "question", "context")
                  if isinstance(record.get(k), str)]
    return texts


def load_model(model_name: str, task_name: str, *, max_length: int = 128, data_dir=None, seed: int = 0,
               vocab_size: int = 512, tokenizer=None):
    """(model, tokenizer) for a task from a name (see MODEL_HELP). Presets are built seeded,
    with `tokenizer` if given (else one trained on the task's text)."""
    spec = get_task(task_name)
    if model_name in MODEL_PRESETS:
        family, overrides = MODEL_PRESETS[model_name]
        if tokenizer is None:
            tokenizer = train_bpe_tokenizer(_task_texts(task_name, data_dir, seed), vocab_size=vocab_size)
        kind = model_kind(family, spec.kind)
        length = {"gpt2": "block_size", "distilbert": "max_position_embeddings", "llama": "max_seq_len"}[family]
        config_cls = models.MODELS[kind][0]
        fields = {**overrides, "vocab_size": tokenizer.vocab_size, length: max_length}
        if kind.endswith("-cls"):
            fields["num_labels"] = spec.num_labels
        torch.manual_seed(seed)
        return models.build_model(kind, config_cls.tiny(**fields)), tokenizer
    if model_name in LLAMA2C_MODELS:
        kind = model_kind("llama", spec.kind)
        overrides = {"num_labels": spec.num_labels} if kind.endswith("-cls") else {}
        folder, weights, tok = LLAMA2C_MODELS[model_name]
        return (load_llama2c(data_file(folder, weights, explicit=data_dir), kind, **overrides),
                Llama2cTokenizer.from_file(data_file(folder, tok, explicit=data_dir)))
    try:
        folder = resolve_source(model_name)
    except FileNotFoundError as err:
        raise ValueError(f"unknown model {model_name!r}: expected {MODEL_HELP} ({err})") from None
    family, _ = config_from_hf(read_hf_config(folder))
    kind = model_kind(family, spec.kind)
    overrides = {"num_labels": spec.num_labels} if kind.endswith("-cls") else {}
    return load_hf_model(folder, kind=kind, **overrides), load_tokenizer(folder)


def load_task_for(task_name: str, tokenizer, *, max_length: int = 128, limit: int | None = None,
                  data_dir=None, seed: int = 0):
    return load_task(task_name, tokenizer, max_length=max_length, limit=limit, data_dir=data_dir, seed=seed)
