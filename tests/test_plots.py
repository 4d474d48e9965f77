"""Plots: every figure is a non-empty PNG, drawn again from files alone by redraw(), and readable:
a panel per task, overlapping lines told apart, labelled log ticks, nothing cut or overlapping."""
import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from trainers import plot_ranks, plots

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
    layers, modules, grid = plot_ranks.rank_grid({"model.layers.0.self_attn.q_proj": 4,
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


# --- readability: structural checks on the figures themselves -----------------------------------
@pytest.fixture
def figures(monkeypatch):
    """Collect the figures instead of saving them (drawn, so sizes and positions are known)."""
    drawn = []

    def keep(fig, path):
        fig.canvas.draw()
        drawn.append(fig)
        return Path(path)
    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(plot_ranks, "_save", keep)
    yield drawn
    import matplotlib.pyplot as plt
    for fig in drawn:
        plt.close(fig)


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _visible_tick_labels(axis):
    lo, hi = sorted(axis.axes.get_ylim())
    return [t.get_text() for t, loc in zip(axis.get_ticklabels(), axis.get_ticklocs())
            if lo <= loc <= hi and t.get_text()]


def _overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _loss_log(folder, losses):
    with open(folder / "loss_log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows([i, v, 1e-3] for i, v in enumerate(losses))


def test_results_loss_plot_has_one_panel_per_task(tmp_path, figures):
    for task, config, scale in (("sst2", "B-FP", 0.7), ("sst2", "B-Q4", 0.69), ("tiny_shakespeare", "B-FP", 6.0)):
        run = tmp_path / f"{task}__{config}"
        run.mkdir()
        (run / "metrics.json").write_text("{}")
        (run / "config.json").write_text(json.dumps({"task": task, "experiment": {"name": config}}))
        _loss_log(run, [scale * (1 + 1 / (1 + s)) for s in range(50)])
    plots.redraw(tmp_path)
    loss_fig = figures[0]
    panels = [ax for ax in loss_fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["sst2", "tiny_shakespeare"]
    assert [len(ax.get_lines()) for ax in panels] == [2, 1]
    assert _legend_texts(panels[0]) == ["B-FP", "B-Q4"]             # the task prefix is dropped


def test_identical_curves_get_distinct_styles_and_a_legend_note(figures):
    falling = [(s, 1.0 / (1 + s)) for s in range(100)]
    plots.plot_loss_curves({"LoRA": falling, "QLoRA": list(falling), "SADRA": list(falling),
                            "AdaLoRA": [(s, 2.0 / (1 + s)) for s in range(100)]}, "unused.png")
    ax = figures[0].axes[0]
    styles = [(line.get_linestyle(), line.get_marker(), line.get_color()) for line in ax.get_lines()]
    assert len(set(styles)) == 4
    assert len({s[:2] for s in styles[:3]}) == 3                    # the three equal lines: dashes and markers
    texts = _legend_texts(ax)
    assert texts[0] == "LoRA" and "overlaps LoRA" in texts[1] and "overlaps LoRA" in texts[2]
    assert texts[3] == "AdaLoRA"


def test_a_curve_falling_to_float_precision_does_not_squeeze_the_others(figures):
    plateau = [(s, 0.1 + 1.0 / (1 + s)) for s in range(200)]
    plots.plot_loss_curves({"LoRA": plateau, "AdaLoRA": [(s, 1.5 * v) for s, v in plateau],
                            "oracle": [(s, 10.0 ** (-12 * s / 199)) for s in range(200)]}, "unused.png")
    ax = figures[0].axes[0]
    assert ax.get_yscale() == "log"
    bottom, top = ax.get_ylim()
    assert bottom >= 1e-5 and top > 1.0                             # 4-5 decades, not 12
    assert "below the axis" in _legend_texts(ax)[2]
    labels = _visible_tick_labels(ax.yaxis)
    assert len(labels) >= 4 and all("10^" not in t and "times" not in t for t in labels), labels


def test_log_axes_label_their_ticks_within_two_decades(figures):
    plots.plot_loss_curves({"a": [(s, 3.0 / (1 + 0.05 * s)) for s in range(200)]}, "unused.png")
    ax = figures[0].axes[0]
    assert ax.get_yscale() == "log"                                 # 3 -> 0.27: more than a decade
    assert len(_visible_tick_labels(ax.yaxis)) >= 3                 # 0.5, 1, 2 (not one lonely label)


def test_legends_sit_beside_the_data(figures):
    plots.plot_loss_curves({f"run{i}": [(s, (i + 1) / (1 + s)) for s in range(50)] for i in range(6)},
                           "unused.png")
    rows = [{"r": r, "metric": "mse", "metric_value": 1 / r, "trainable_pct": r} for r in (1, 4, 16)]
    plots.plot_rank_ablation(rows + [{"r": "full", "metric": "mse", "metric_value": 0.01, "trainable_pct": 100}],
                             "unused.png")
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        legend = fig.axes[0].get_legend() or fig.legends[0]
        assert not _overlap(legend.get_window_extent(renderer), fig.axes[0].get_window_extent(renderer))


def _llama_history():
    names = [f"model.layers.{i}.{m}" for i in range(5) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names, [{"step": s, "ranks": {n: max(1, 12 - s // 10 - (i % 4)) for i, n in enumerate(names)}}
                   for s in range(0, 60, 10)]


def test_rank_heatmap_names_are_whole_and_panels_do_not_overlap(figures):
    names, history = _llama_history()
    plot_ranks.plot_rank_heatmap(history, "unused.png", reference={n: 8 for n in names})
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3                                          # final, reference, over time
    rows = [t.get_text() for t in panels[2].get_yticklabels()]
    assert rows[0] == "0.self_attn.q_proj" and rows[-1] == "4.mlp.down_proj"
    assert [t.get_text() for t in panels[0].get_xticklabels()][-1] == "mlp.down_proj"
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]         # tick labels included
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert panels[2].collections[0].get_clim()[1] >= 12             # the scale covers the history's ranks
    assert panels[2].get_xlim()[0] <= 0 and panels[2].get_xlim()[1] >= 50       # x in real steps (0..50)


def test_ablation_tables_do_not_cut_labels():
    from trainers.ablations import format_rows
    rows = [{"targets": "Q,K,V (fused c_attn)", "modules": "c_attn attn.c_proj mlp.c_fc mlp.c_proj",
             "trainable_params": 8256, "trainable_pct": 16.15, "metric": "accuracy", "metric_value": 0.5,
             "final_loss": 0.6749, "wall_time_s": 0.086}]
    table = format_rows("targets", rows)
    assert "Q,K,V (fused c_attn)" in table and "c_attn attn.c_proj mlp.c_fc mlp.c_proj" in table
    header, line = table.splitlines()
    assert header.index("modules") == line.index("c_attn attn")     # columns line up


def test_draw_run_draws_a_run_folder_made_by_the_trainer(tmp_path):
    from trainers.planted import PlantedConfig, PlantedTask, build_planted, run_method
    cfg = PlantedConfig.quick(dim=16, planted=((4, 0), (0, 2)), steps=20, batch_size=32, eval_examples=64)
    base, teacher, _ = build_planted(cfg)
    run = tmp_path / "draftq"
    run_method("DRaFT-Q", cfg, base, PlantedTask(teacher, cfg), run)   # the trainer writes the folder
    assert not list(run.glob("*.png"))
    written = plots.draw_run(run)
    assert set(written) == {run / "loss_curve.png", run / "rank_heatmap.png"}
    assert all(_is_png(p) for p in written)
    assert set(plots.redraw(run)) == set(written)                   # a run folder redraws as itself


def test_draw_run_names_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        plots.draw_run(tmp_path)
