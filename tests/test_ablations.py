"""Ablations: the module ladders name real layers, the accounting is exact, and one ablation
runs end to end on the planted task and writes one full CSV row per run."""
import copy
import csv

import pytest

from trainers import ablations as A


def _tiny(family):
    from trainers import models as M
    if family == "llama":
        return M.build_model("llama", M.LlamaConfig.tiny())
    if family == "gpt2":
        return M.build_model("gpt2", M.GPT2Config.tiny())
    return M.build_model("distilbert-cls", M.DistilBertConfig.tiny())


@pytest.mark.parametrize("family", ["llama", "gpt2", "distilbert"])
def test_target_ladders_name_real_layers_and_grow(family):
    from lora.model import LoraConfig, find_targets
    model = _tiny(family)
    previous = set()
    for label, modules in A.TARGET_LADDERS[family]:
        names = set(find_targets(model, LoraConfig(target_modules=modules)))
        assert names > previous, label              # every rung adapts strictly more layers
        previous = names
    # GPT-2's Q, K and V live in one fused layer: its ladder has no Q-only rung
    if family == "gpt2":
        assert [label for label, _ in A.TARGET_LADDERS["gpt2"]][0].startswith("Q,K,V")


def state_bytes(model):
    from trainers.train import training_state_bytes
    return training_state_bytes(model)["state_bytes"]


def test_state_bytes_counts_weights_grads_and_moments():
    from trainers.planted import PlantedConfig, build_planted
    base, _, _ = build_planted(PlantedConfig.quick())
    n = sum(p.numel() for p in base.parameters())
    assert state_bytes(base) == 4 * n                      # frozen float32: weights only
    full = copy.deepcopy(base).requires_grad_(True)
    assert state_bytes(full) == 4 * n * 4                  # + grad + two AdamW moments
    from quantization import quantize_model
    q = quantize_model(copy.deepcopy(base), bits=4)
    assert state_bytes(q) < state_bytes(base) / 6       # NF4 + double quant: ~4.13 bits a weight


def test_rank_ablation_end_to_end(tmp_path):
    settings = A.AblationSettings(task="planted", steps=20, batch_size=32, ranks=(1, 4), planted_dim=32,
                                  eval_examples=256, isolate=False)
    rows = A.run_ablation("rank", settings, out=tmp_path)
    assert [r["r"] for r in rows] == [1, 4, "full"]
    with open(tmp_path / "rank_ablation.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3                                          # one row per run
    for row in table:
        for column, value in row.items():
            assert value not in ("", "n/a", None), (row["r"], column)   # every column filled
    pct = [float(r["trainable_pct"]) for r in table]
    assert pct[0] < pct[1] < pct[2] == 100.0
    assert int(table[1]["trainable_params"]) == 4 * int(table[0]["trainable_params"])   # r (in + out) per layer
    with open(tmp_path / "experiment_summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    for folder in ("r01", "r04", "full"):
        assert (tmp_path / folder / "metrics.json").exists()


def test_target_points_on_planted():
    ctx = A._Context(A.AblationSettings(task="planted", planted_dim=32, eval_examples=64))
    points = A.ablation_points("targets", ctx)
    assert [own["targets"] for _, _, own in points] == ["fc1", "fc2", "fc1,fc2"]
    assert [exp.target_modules for _, exp, _ in points][-1] == ("fc1", "fc2")
    assert len({folder for folder, _, _ in points}) == len(points)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="rank, targets, memory"):
        A.run_ablation("width", A.AblationSettings(task="planted"))


def test_memory_ablation_on_stories260k(stories260k, tmp_path):
    """The default real setting (stories260K on Tiny Shakespeare), tiny: full FT vs LoRA vs QLoRA.
    In-process (isolate=False): the peak is per run only where train() can reset it (Linux); state_bytes always is."""
    settings = A.AblationSettings(steps=3, batch_size=4, limit=16, eval_examples=8, max_length=32,
                                  data_dir=str(stories260k.parent), isolate=False)
    rows = A.run_ablation("memory", settings, out=tmp_path)
    assert [r["method"] for r in rows] == ["full", "lora", "lora+nf4"]
    assert all(r["task"] == "tiny_shakespeare" and r["metric"] == "perplexity" for r in rows)
    full, lora, qlora = (r["state_bytes"] for r in rows)
    assert full > lora > qlora                       # grads + moments of every weight > adapters > 4-bit base
    with open(tmp_path / "memory_ablation.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and all(v not in ("", "n/a") for row in table for v in row.values())
