"""Every experiment knob reaches the model and the run's config.json; a run records its own peak memory,
its analytic training state, its inference speed, its bits and rank history (tiny models, few steps)."""
import dataclasses
import json
import resource
import sys
import types

import pytest
import torch
import torch.nn as nn

import trainers.__main__ as cli
from lora.model import adapter_layers
from quantization.layers import Linear4bit, Linear8bit
from tests.test_experiments import calibration, run, synthetic_task, tiny_cls, tiny_lm
from trainers.configs import CONFIGS, ExperimentConfig, parse_bits, parse_mapping, parse_targets
from trainers.evaluate import make_evaluator
from trainers.flags import experiment_overrides
from trainers.prepare import prepare

MIB = 2 ** 20


# ----------------------------------------------------------------------------- configuration

def test_all_linear_and_regex_targets_stay_one_string():
    assert ExperimentConfig("x", target_modules="all-linear").target_modules == "all-linear"
    assert ExperimentConfig("x", target_modules=r".*\.c_(attn|fc)").target_modules == r".*\.c_(attn|fc)"
    assert ExperimentConfig("x", target_modules=["c_attn", "c_fc"]).target_modules == ("c_attn", "c_fc")
    assert parse_targets("all-linear") == "all-linear" and parse_targets(r".*\.c_fc") == r".*\.c_fc"
    assert parse_targets("c_attn, mlp.c_fc") == ("c_attn", "mlp.c_fc") and parse_targets("none") is None


def test_text_forms_of_bits_and_rank_patterns():
    assert [parse_bits(t) for t in ("4", "8", "mixed", "none")] == [4, 8, "mixed", None]
    assert parse_bits("c_attn=8,c_fc=4") == {"c_attn": 8, "c_fc": 4} == parse_bits('{"c_attn": 8, "c_fc": 4}')
    assert parse_mapping("h.0.attn.c_attn=2, h.1.attn.c_attn=6", "--rank-pattern") == {"h.0.attn.c_attn": 2,
                                                                                         "h.1.attn.c_attn": 6}
    for bad in ("c_attn", "c_attn=x", "c_attn=2.5"):
        with pytest.raises(ValueError, match="--rank-pattern"):
            parse_mapping(bad, "--rank-pattern")
    with pytest.raises(ValueError, match="4 or 8"):
        ExperimentConfig("x", quant={"c_attn": 3})


def parse(*flags):
    args = cli.build_parser().parse_args(["run", "--config", "B-FP", "--task", "sst2", *flags])
    return args, experiment_overrides(args)


def test_every_experiment_field_is_a_flag():
    """Each ExperimentConfig field (but name and description) is an option, parsed to the field's type."""
    _, got = parse("--rank", "6", "--alpha", "12", "--targets", "all-linear", "--bits", "c_attn=8,c_fc=4",
                   "--method", "dora", "--allocation", "manual", "--rank-pattern", "c_attn=4", "--target-r", "3",
                   "--lora-dropout", "0.1", "--mixed-high-fraction", "0.25", "--sparsity", "0.3", "--l1", "0.01",
                   "--alpha-per-rank", "2", "--lr-scale", "10", "--r-min", "1", "--r-max", "12", "--tinit", "2",
                   "--tfinal", "3", "--delta-t", "4", "--orth-reg-weight", "0.2", "--interval", "5",
                   "--n-change", "2", "--memory-cap-bytes", "100000", "--signal", "spread")
    assert got == dict(r=6, lora_alpha=12.0, target_modules="all-linear", quant={"c_attn": 8, "c_fc": 4},
                       method="dora", allocation="manual", rank_pattern={"c_attn": 4}, target_r=3, lora_dropout=0.1,
                       mixed_high_fraction=0.25, sparsity=0.3, l1=0.01, alpha_per_rank=2.0, lr_scale=10.0, r_min=1,
                       r_max=12, tinit=2, tfinal=3, delta_t=4, orth_reg_weight=0.2, interval=5, n_change=2,
                       memory_cap_bytes=100000, signal="spread")
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"name", "description"}
    assert set(got) == fields
    assert parse()[1] == {}                          # not given: the named config's values stay
    dataclasses.replace(CONFIGS["B-FP"], **got)      # and together they make a valid config
    with pytest.raises(ValueError, match="--r-min"):
        parse("--r-min", "two")


def test_optional_numbers_take_none():
    args, _ = parse("--limit", "none", "--eval-examples", "none")
    settings = cli.from_args(cli.RunSettings, args)
    assert settings.limit is None and settings.eval_examples is None
    assert parse("--target-r", "none")[1] == {"target_r": None}


# ----------------------------------------------------------------------------- the knobs reach the model

def test_all_linear_targets_put_adapters_on_the_mlp():
    model, _ = prepare(tiny_lm(), dataclasses.replace(CONFIGS["B-FP"], target_modules="all-linear"))
    names = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)}
    assert names == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    model, _ = prepare(tiny_lm(), dataclasses.replace(CONFIGS["B-FP"], target_modules=r".*\.mlp\.c_fc"))
    assert [n for n, _ in adapter_layers(model)] == [f"transformer.h.{i}.mlp.c_fc" for i in range(3)]


def test_sadra_on_all_linear_with_alpha_per_rank_and_rank_bounds():
    task = synthetic_task()
    exp = dataclasses.replace(CONFIGS["SADRA"], target_modules="all-linear", alpha_per_rank=2.0, r_min=3, r_max=10)
    model, _ = prepare(tiny_lm(), exp, calibration(task), n_calibration=2, max_probes=4)
    layers = adapter_layers(model)
    assert any(".mlp." in n for n, _ in layers)                      # the feed-forward layers can get rank
    assert len({layer.rank for _, layer in layers}) > 1
    assert all(3 <= layer.rank <= 10 for _, layer in layers)
    assert all(layer.alpha == 2.0 * layer.rank and layer.scaling == 2.0 for _, layer in layers)


def test_rank_pattern_reaches_joint3_and_mixed_bits_are_written(tmp_path):
    pattern = {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.attn.c_attn": 5, "transformer.h.2.attn.c_attn": 3}
    exp = dataclasses.replace(CONFIGS["Joint-3"], rank_pattern=pattern)
    run(tmp_path, "j3", exp, steps=2)
    config = json.loads((tmp_path / "j3" / "config.json").read_text())
    assert config["experiment"]["rank_pattern"] == pattern
    assert {n: a["rank"] for n, a in config["used"]["adapters"].items()} == pattern   # not a depth ramp
    bits = json.loads((tmp_path / "j3" / "bits.json").read_text())
    assert set(bits.values()) == {4, 8} and len(bits) == 3 * 4      # which layers got 8 bits, which 4


def test_a_bits_pattern_gives_mixed_layers():
    exp = dataclasses.replace(CONFIGS["B-FP"], quant={"c_attn": 8, "c_fc": 4})
    model, _ = prepare(tiny_lm(), exp)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["transformer.h.0.attn.c_attn.base_layer"] is Linear8bit
    assert kinds["transformer.h.0.mlp.c_fc"] is Linear4bit
    assert kinds["transformer.h.0.mlp.c_proj"] is nn.Linear                  # no pattern: stays float


def test_adalora_schedule_and_controller_knobs_reach_the_allocators():
    exp = dataclasses.replace(CONFIGS["B-Ada"], r=6, target_r=2, tinit=3, tfinal=4, delta_t=5, orth_reg_weight=0.3)
    _, ada = prepare(tiny_lm(), exp, steps=40)
    c = ada.config
    assert (c.init_r, c.target_r, c.tinit, c.tfinal, c.deltaT, c.orth_reg_weight) == (6, 2, 3, 4, 5, 0.3)
    exp = dataclasses.replace(CONFIGS["DRaFT-Q"], r=3, interval=7, n_change=2, r_min=1, r_max=9,
                              memory_cap_bytes=123456)
    model, draft = prepare(tiny_lm(), exp, steps=40)
    c = draft.config
    assert (c.interval, c.n_change, c.r_min, c.r_max, c.memory_cap_bytes) == (7, 2, 1, 9, 123456)
    assert all(layer.rank == 3 for _, layer in adapter_layers(model))        # the start rank


def test_lr_scale_and_the_choices_are_in_config_json(tmp_path):
    assert CONFIGS["HiRA"].lr_scale == 10.0                                     # the recipe
    run(tmp_path, "h", dataclasses.replace(CONFIGS["HiRA"], lr_scale=3.0), steps=3)
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["train"]["lr"] == pytest.approx(0.03) and config["experiment"]["lr_scale"] == 3.0
    with open(tmp_path / "h" / "loss_log.csv") as f:
        assert max(float(line.split(",")[2]) for line in list(f)[1:]) == pytest.approx(0.03)
    assert config["used"]["allocator"]["type"] == "NullAllocator"
    assert all(a["type"] == "HiRALinear" and a["rank"] == 8 for a in config["used"]["adapters"].values())


def test_adaptive_runs_write_their_rank_history(tmp_path):
    exp = dataclasses.replace(CONFIGS["B-Ada"], tinit=1, tfinal=2, delta_t=1)
    run(tmp_path, "ada", exp, steps=12)
    history = json.loads((tmp_path / "ada" / "rank_history.json").read_text())
    assert len(history) > 2 and history[0]["step"] == 0
    final = json.loads((tmp_path / "ada" / "metrics.json").read_text())["final_ranks"]
    assert set(history[-1]["ranks"]) == set(final)


# ----------------------------------------------------------------------------- what a run measures

@pytest.mark.parametrize("config, kind, unit", [("B-FP", "lm", "tokens/s"), ("B-Q4", "classification", "examples/s"),
                                                ("Full-FT", "lm", "tokens/s")])
def test_inference_speed_is_reported_unmerged_and_merged(tmp_path, config, kind, unit):
    row = run(tmp_path, "a", config, kind=kind, steps=2)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for column in ("inference_b1_per_s", "inference_batched_per_s", "inference_b1_merged_per_s",
                   "inference_batched_merged_per_s", "inference_latency_ms_b1"):
        assert metrics[column] > 0 and row[column] == metrics[column], column
    assert metrics["inference_unit"] == unit and row["inference_batch_size"] == 8
    assert row["inference_merged_base"] == {"B-FP": "float", "B-Q4": "adapted layers dequantized to float",
                                            "Full-FT": "no adapters (merged = unmerged)"}[config]
    assert metrics["tokens_per_s"] > 0                  # training throughput is another column


def test_state_bytes_are_recorded_in_bytes_and_mib(tmp_path):
    rows = {c: run(tmp_path, c, c, steps=2) for c in ("Full-FT", "B-FP", "B-Q4")}
    for row in rows.values():
        assert row["state_mib"] == pytest.approx(row["state_bytes"] / MIB, abs=1e-3)
        assert row["peak_memory_mib"] == pytest.approx(row["peak_memory_bytes"] / MIB, abs=1e-3)
    assert rows["Full-FT"]["state_bytes"] > rows["B-FP"]["state_bytes"] > rows["B-Q4"]["state_bytes"]


class HFStyle(nn.Module):
    """A trainers model behind a transformers-like interface: labels=, and a ModelOutput-like result."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits, loss = self.inner(input_ids, attention_mask=attention_mask, targets=labels)
        return types.SimpleNamespace(logits=logits, loss=loss)


@pytest.mark.parametrize("kind, make", [("lm", tiny_lm), ("classification", tiny_cls)])
def test_evaluator_reads_model_outputs_with_logits(kind, make):
    task = synthetic_task(kind)
    model = make().eval()
    assert make_evaluator(task, batch_size=5)(HFStyle(model)) == make_evaluator(task, batch_size=5)(model)


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU peak can be reset on Linux only")
def test_a_run_records_its_own_cpu_peak_not_the_process_s(tmp_path):
    """A peak reached earlier in the process (a 600 MiB tensor) is not the run's."""
    big = torch.ones(600 * MIB // 4)
    del big
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert parent > 600 * MIB
    row = run(tmp_path, "a", "B-FP", steps=2)
    assert row["peak_memory_kind"] == "cpu_peak_rss" and row["peak_memory_bytes"] < parent - 300 * MIB


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def raise_unpicklable():
    raise Unpicklable(1, 2)


def test_errors_in_a_fresh_process_come_back():
    from trainers.isolated import in_fresh_process
    assert in_fresh_process(int, "7") == 7
    with pytest.raises(ValueError, match="bad value"):            # as themselves when they can travel
        in_fresh_process(int, "bad value")
    with pytest.raises(RuntimeError, match="Unpicklable: 1 and 2"):   # else by type name and message
        in_fresh_process(raise_unpicklable)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_matrix_cells_do_not_inherit_earlier_peaks(tmp_path, capsys, shared_data):
    """Each cell runs in its own process: a peak reached earlier in this process (here a 600 MiB
    tensor) does not show in the cells' records, as it would if they ran in this process."""
    big = torch.ones(600 * MIB // 4)
    del big
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert parent > 600 * MIB
    flags = ["--model", "gpt2-tiny", "--steps", "2", "--limit", "24", "--max-length", "16", "--batch-size", "4",
             "--eval-examples", "4", "--warmup-steps", "1", "--no-progress", "--device", "cpu",
             "--inference-iters", "1"]
    assert cli.main(["matrix", "--tasks", "sst2", "--configs", "Full-FT,B-FP", "--results", str(tmp_path),
                     "--targets", "c_attn,mlp.c_fc", *flags]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "[1/2] sst2__Full-FT" in err and "[2/2] sst2__B-FP" in err           # a line per finished run
    assert f"figure: {tmp_path / 'loss_curves.png'}" in captured.out          # the matrix draws its figures
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    for name in ("sst2__Full-FT", "sst2__B-FP"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["peak_memory_kind"] == "cpu_peak_rss" and metrics["peak_memory_bytes"] < parent - 300 * MIB
    config = json.loads((tmp_path / "sst2__B-FP" / "config.json").read_text())
    assert config["experiment"]["target_modules"] == ["c_attn", "mlp.c_fc"]     # the override reached the cell
    assert any(n.endswith("mlp.c_fc") for n in config["used"]["adapters"])


# ----------------------------------------------------------------------------- the command line

def test_run_writes_the_given_values_and_draws_its_figures(tmp_path, capsys, monkeypatch, shared_data):
    import trainers.plots
    drawn = []
    monkeypatch.setattr(trainers.plots, "draw_run", lambda run_dir: drawn.append(run_dir) or [run_dir / "loss.png"],
                        raising=False)
    code = cli.main(["run", "--config", "SADRA", "--task", "sst2", "--model", "gpt2-tiny", "--steps", "2",
                     "--limit", "24", "--max-length", "16", "--batch-size", "4", "--eval-examples", "none",
                     "--no-progress", "--device", "cpu", "--results", str(tmp_path), "--targets", "all-linear",
                     "--alpha-per-rank", "2", "--r-min", "1", "--r-max", "12", "--lr-scale", "3", "--lr", "0.01",
                     "--bits", "c_attn=8,c_fc=4", "--inference-iters", "1"])
    assert code == 0
    run_dir = tmp_path / "sst2__SADRA"
    out = capsys.readouterr().out
    assert drawn == [run_dir] and f"figure: {run_dir / 'loss.png'}" in out and f"results: {run_dir}" in out
    config = json.loads((run_dir / "config.json").read_text())
    exp = config["experiment"]
    assert (exp["target_modules"], exp["alpha_per_rank"], exp["r_min"], exp["r_max"], exp["lr_scale"]) == \
        ("all-linear", 2.0, 1, 12, 3.0)
    assert exp["quant"] == {"c_attn": 8, "c_fc": 4} and config["settings"]["eval_examples"] is None
    assert config["train"]["lr"] == pytest.approx(0.03)
    adapters = config["used"]["adapters"]
    assert any(".mlp." in n for n in adapters) and all(a["alpha"] == 2 * a["rank"] for a in adapters.values())
    bits = json.loads((run_dir / "bits.json").read_text())
    assert set(bits.values()) == {4, 8} and all(("c_attn" in n) == (b == 8) for n, b in bits.items())


def test_run_without_figures_says_so(tmp_path, capsys, monkeypatch, shared_data):
    import trainers.plots

    def no_matplotlib(run_dir):
        raise ImportError("plots need matplotlib (pip install matplotlib)")
    monkeypatch.setattr(trainers.plots, "draw_run", no_matplotlib, raising=False)
    assert cli.main(["run", "--config", "B-FP", "--task", "sst2", "--model", "gpt2-tiny", "--steps", "1",
                     "--limit", "16", "--max-length", "16", "--batch-size", "4", "--eval-examples", "4",
                     "--no-progress", "--device", "cpu", "--results", str(tmp_path), "--inference-iters", "0"]) == 0
    assert "no figures drawn" in capsys.readouterr().err and (tmp_path / "sst2__B-FP" / "metrics.json").exists()


def test_ablate_shows_progress_takes_overrides_and_names_its_folder(tmp_path, capsys):
    code = cli.main(["ablate", "rank", "--task", "planted", "--steps", "3", "--batch-size", "8", "--ranks", "1,2",
                     "--eval-examples", "none", "--no-isolate", "--out", str(tmp_path / "out"), "--targets", "fc1"])
    assert code == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"]
    assert all("mse = " in line and " s" in line for line in lines)
    assert f"results: {tmp_path / 'out'}" in captured.out
    config = json.loads((tmp_path / "out" / "r02" / "config.json").read_text())
    assert config["used"]["adapters"] and all(n.endswith(".fc1") for n in config["used"]["adapters"])   # --targets
    assert cli.main(["ablate", "rank", "--task", "planted", "--rank", "4", "--out", str(tmp_path / "o2")]) == 2
    assert "sets r itself" in capsys.readouterr().err


def test_ablation_points_run_in_fresh_processes(tmp_path):
    """Off CUDA every point is isolated by default: its peak is its own, not this process's."""
    from trainers import ablations as A
    big = torch.ones(600 * MIB // 4)
    del big
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    assert parent > 600 * MIB
    settings = A.AblationSettings(task="planted", steps=2, batch_size=8, ranks=(1,), planted_dim=16,
                                  eval_examples=16, device="cpu")
    rows = A.run_ablation("rank", settings, out=tmp_path)
    assert [r["r"] for r in rows] == [1, "full"]
    assert all(r["peak_memory_bytes"] < parent - 300 * MIB for r in rows)
