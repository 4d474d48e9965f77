"""Named experiment matrices: one word for a whole protocol (`python -m trainers matrix --preset NAME`).

A preset fills in the matrix's options (tasks, configurations, training and data settings,
experiment overrides) as defaults; any option given on the command line still wins, so

    python -m trainers matrix --preset real-ranks                     # the README's real-model table
    python -m trainers matrix --preset real-ranks --tasks wikitext2   # the same protocol, another text

Values are the command line's text forms (what you would type after the flag), keyed by the
option's name without dashes (`warmup_steps` is `--warmup-steps`); experiment overrides
(ExperimentConfig fields such as `target_modules`) apply to every configuration of the preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tasks: str                             # comma-separated task names (--tasks)
    configs: str                           # comma-separated configuration names (--configs)
    options: dict = field(default_factory=dict)   # option name -> value, as on the command line
    run_time: str = ""                     # measured wall time of the whole matrix, and where

    def train_config(self, **changes):
        """The preset's TrainConfig (its training options over TrainConfig's defaults), with `changes`."""
        from trainers.train import TrainConfig
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{**{k: v for k, v in self.options.items() if k in names}, **changes})

    def experiment(self, config: str):
        """Named configuration `config` with the preset's experiment options applied (text forms
        parsed as the command line parses them)."""
        from trainers.configs import FIELD_PARSERS, ExperimentConfig, get_config
        names = {f.name for f in fields(ExperimentConfig)}
        given = {k: FIELD_PARSERS[k](v) if k in FIELD_PARSERS and isinstance(v, str) else v
                 for k, v in self.options.items() if k in names}
        return replace(get_config(config), **given)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        "real-ranks",
        "adaptive ranks against uniform LoRA at one parameter budget on the real stories260K model "
        "fine-tuned on Tiny Shakespeare: blocks of 256 tokens, 600 steps x 16 "
        "blocks, AdamW lr 3e-3, 30 warm-up steps then cosine to 0, no clipping, every linear layer "
        "adapted, the budget of uniform r=8, held-out perplexity on every eval block",
        tasks="tiny_shakespeare",
        configs="B-FP,B-Q4,SADRA,DRaFT-Q,B-Ada",
        options={"model": "stories260K", "max_length": 256, "eval_examples": None, "steps": 600,
                 "batch_size": 16, "lr": 3e-3, "warmup_steps": 30, "schedule": "cosine_hf", "clip": 0.0,
                 "eval_every": 0, "inference_iters": 0, "budget_rank": 8, "seed": 0,
                 "target_modules": "all-linear"},
        run_time="about 35 minutes on 2 CPU cores: 34 min measured on one thread, README"),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
