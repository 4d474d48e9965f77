"""Plots: every figure is a non-empty PNG, drawn again from files alone by redraw()."""
import csv
import json

import pytest

pytest.importorskip("matplotlib")

from trainers import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 1000


def _fake_results(root):
    """Two runs (one static, one with a changing rank history) plus both ablation CSVs."""
    names = [f"blocks.{i}.{m}" for i in range(3) for m in ("fc1", "fc2")]
    for run, loss0, history in (
            ("lora", 1.0, [{"step": 0, "ranks": {n: 8 for n in names}}]),
            ("draft", 2.0, [{"step": s, "ranks": {n: 4 + (s // 10) * (i % 3) for i, n in enumerate(names)}}
                            for s in (0, 10, 20, 30)])):
        folder = root / run
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"metric": "mse", "metric_value": loss0 / 10}))
        (folder / "config.json").write_text(json.dumps({"experiment": {"name": run}}))
        with open(folder / "loss_log.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss", "lr"])
            for step in range(40):
                writer.writerow([step, loss0 / (1 + step), 1e-3])
        (folder / plots.RANK_HISTORY).write_text(json.dumps(history))
    with open(root / "rank_ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["r", "metric", "metric_value", "trainable_pct"])
        writer.writeheader()
        for r in (1, 2, 4, 8):
            writer.writerow({"r": r, "metric": "mse", "metric_value": 1 / r, "trainable_pct": r * 0.5})
        writer.writerow({"r": "full", "metric": "mse", "metric_value": 0.05, "trainable_pct": 100})
    with open(root / "memory_ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["label", "peak_memory_bytes", "metric", "metric_value", "wall_time_s"])
        writer.writeheader()
        for label, mem in (("full", 3e8), ("lora", 2e8), ("qlora", 1e8)):
            writer.writerow({"label": label, "peak_memory_bytes": mem, "metric": "mse",
                             "metric_value": mem / 1e9, "wall_time_s": 2.0})
    (root / "planted.json").write_text(json.dumps({"planted_ranks": {n: i for i, n in enumerate(names)}}))


def test_redraw_writes_every_figure(tmp_path):
    _fake_results(tmp_path)
    written = plots.redraw(tmp_path)
    expected = {tmp_path / "loss_curves.png", tmp_path / "rank_ablation.png", tmp_path / "memory_quality.png",
                tmp_path / "lora" / "rank_heatmap.png", tmp_path / "draft" / "rank_heatmap.png"}
    assert set(written) == expected
    assert all(_is_png(p) for p in written)
    # again, from the files alone: same figures, replaced in place, nothing else appears
    before = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert set(plots.redraw(tmp_path)) == expected
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == before


def test_rank_grid_layers_and_modules():
    layers, modules, grid = plots.rank_grid({"model.layers.0.self_attn.q_proj": 4,
                                             "model.layers.1.self_attn.q_proj": 2,
                                             "model.layers.1.mlp.up_proj": 8})
    assert layers == [0, 1] and modules == ["self_attn.q_proj", "mlp.up_proj"]
    assert grid[1] == [2.0, 8.0] and grid[0][0] == 4.0 and grid[0][1] != grid[0][1]   # NaN: no adapter


def test_redraw_on_an_empty_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to draw"):
        plots.redraw(tmp_path)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"nanopeft\[plot\]"):
        plots.plot_loss_curves({"a": [(0, 1.0)]}, "unused.png")
