"""What an ablation is asked to do: its settings, the default task and model, and the module ladders.

Defaults: stories260K (llama2.c, a real 260K-parameter LLaMA) on Tiny Shakespeare when the
offline data folder has them, else the planted-rank task of trainers/planted.py (no data).

Q, K, V per model family. LLaMA (q_proj, k_proj, v_proj, o_proj; MLP gate/up/down_proj) and
DistilBERT (q_lin, k_lin, v_lin, out_lin; MLP ffn.lin1/lin2) have separate projections.
GPT-2 computes Q, K and V in one fused Linear, `attn.c_attn` (768 -> 3 * 768), so an adapter
there always adapts all three: its ladder is "Q,K,V (fused c_attn)", "+O (attn.c_proj)",
"all (+ mlp.c_fc, mlp.c_proj)", and the Q and Q,K rungs do not exist (we do not pretend to
split a fused layer). The planted MLP has no attention: its ladder is fc1, fc2, both.

The ablations themselves (running the points, the tables, the command line) are in
trainers/ablations.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

KINDS = ("rank", "targets", "memory")
RANKS = (1, 2, 4, 8, 16, 32, 64)
# family -> [(label, target modules)], each rung adding modules to the one before.
TARGET_LADDERS = {
    "llama": [("Q", ("q_proj",)), ("Q,K", ("q_proj", "k_proj")), ("Q,K,V", ("q_proj", "k_proj", "v_proj")),
              ("Q,K,V,O", ("q_proj", "k_proj", "v_proj", "o_proj")),
              ("all", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))],
    "distilbert": [("Q", ("q_lin",)), ("Q,K", ("q_lin", "k_lin")), ("Q,K,V", ("q_lin", "k_lin", "v_lin")),
                   ("Q,K,V,O", ("q_lin", "k_lin", "v_lin", "out_lin")),
                   ("all", ("q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2"))],
    "gpt2": [("Q,K,V (fused c_attn)", ("c_attn",)), ("Q,K,V,O", ("c_attn", "attn.c_proj")),
             ("all", ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))],
    "planted": [("fc1", ("fc1",)), ("fc2", ("fc2",)), ("fc1,fc2", ("fc1", "fc2"))],
}
# The ablation CSVs' columns (after these, every column of the run summary follows).
COLUMNS = {
    "rank": ("r", "trainable_params", "trainable_pct", "metric", "metric_value", "final_loss", "wall_time_s"),
    "targets": ("targets", "modules", "trainable_params", "trainable_pct", "metric", "metric_value", "final_loss",
                "wall_time_s"),
    "memory": ("label", "method", "peak_memory_mib", "peak_memory_kind", "state_mib", "peak_memory_bytes",
               "state_bytes", "metric", "metric_value", "final_loss", "wall_time_s", "trainable_params"),
}


@dataclass
class AblationSettings:
    task: str | None = None          # a task name (trainers.data.TASKS) or "planted"; None: the default above
    model: str | None = None         # see trainers.experiments.MODEL_HELP; None: stories260K (planted: its MLP)
    steps: int = 200                 # optimizer steps per run
    batch_size: int = 16             # examples per step (planted: fresh samples)
    lr: float = 1e-3                 # learning rate of every run (LoRA and full fine-tuning alike)
    full_ft_lr: float | None = None  # a separate lr for full fine-tuning; None: `lr`
    max_length: int = 128            # tokens per example (LM: block size)
    limit: int | None = 2000         # at most this many examples (LM: blocks) per split
    eval_examples: int | None = 256  # evaluate on at most this many eval examples
    data_dir: str | None = None      # the offline data folder (default: trainers.paths.data_dir())
    seed: int = 0
    device: str | None = None
    ranks: tuple = RANKS             # the rank ablation's ranks
    isolate: bool | None = None      # run each point in a fresh process; None: unless on CUDA
    planted_dim: int = 64            # the planted task's width (when task is "planted")
    experiment: dict = field(default_factory=dict)   # ExperimentConfig fields set in the LoRA points

    def __post_init__(self):
        """Refuse a bad value when the settings are built (trainers/config_checks.py)."""
        from trainers.config_checks import check_device, check_floats, check_ints
        check_ints(self, ("steps", "batch_size", "max_length", "planted_dim"), minimum=1)
        check_ints(self, ("limit", "eval_examples"), minimum=1, optional=True)
        check_ints(self, ("seed",), minimum=0)
        check_floats(self, ("lr",), minimum=0)
        check_floats(self, ("full_ft_lr",), minimum=0, optional=True)
        check_device(self)
        self.ranks = tuple(self.ranks)
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.ranks):
            raise ValueError(f"AblationSettings.ranks (--ranks): expected integers >= 1, got {self.ranks!r}")
        if self.task not in (None, "planted"):
            from trainers.data import get_task
            get_task(self.task)                  # a KeyError naming the known tasks
        from trainers.configs import CONFIGS
        self.experiment = dict(self.experiment)
        dataclasses.replace(CONFIGS["B-FP"], **self.experiment)     # unknown fields and bad values fail here


def resolve_defaults(s: AblationSettings) -> AblationSettings:
    """Fill task/model: stories260K on Tiny Shakespeare when the data folder has both, else the
    planted task; a task given without a model gets stories260K for language modelling (when
    present) and the trainer's default preset (RunSettings.model) otherwise."""
    if s.task == "planted" or (s.task is not None and s.model is not None):
        return s
    from trainers.paths import data_dir
    root = data_dir(s.data_dir)
    stories = root is not None and (root / "stories260K" / "stories260K.bin").exists()
    if s.task is None:
        have = stories and (root / "tiny_shakespeare" / "input.txt").exists()
        return dataclasses.replace(s, task="tiny_shakespeare" if have else "planted",
                                   model=s.model or ("stories260K" if have else None))
    from trainers.data import get_task
    from trainers.experiments import RunSettings
    lm = get_task(s.task).kind == "lm"
    return dataclasses.replace(s, model="stories260K" if lm and stories else RunSettings().model)
