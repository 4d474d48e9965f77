"""`python -m trainers`: help lists the names, unknown names fail with the known ones,
no silent overwrite, dispatch to the default job and the plots (no data needed)."""
import subprocess
import sys

import pytest

import trainers.__main__ as cli
from trainers.data import TASKS
from trainers.experiments import CONFIGS, MODEL_PRESETS
from trainers.paths import REPO_ROOT
from trainers.train import TrainConfig


def test_help_lists_configs_tasks_and_models():
    out = subprocess.run([sys.executable, "-m", "trainers", "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in [*CONFIGS, *TASKS, *MODEL_PRESETS, "stories260K", "run", "matrix", "ablate", "plots"]:
        assert name in out.stdout, name


def test_run_help_has_the_dataclass_options(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--lr", "--grad-accum", "--paged-adamw", "--checkpoint-every", "--max-length",
                 "--limit", "--model", "--overwrite", "--config", "--task"):
        assert flag in out, flag


def test_options_fill_the_dataclasses():
    args = cli.build_parser().parse_args(["run", "--config", "B-Q4", "--task", "sst2", "--steps", "7",
                                          "--lr", "0.01", "--paged-adamw", "--no-progress", "--limit", "50"])
    cfg = cli.from_args(TrainConfig, args)
    assert (cfg.steps, cfg.lr, cfg.paged_adamw, cfg.progress, cfg.device) == (7, 0.01, True, False, None)
    assert cli.from_args(cli.RunSettings, args).limit == 50


def test_unknown_config_fails_with_the_known_list(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["run", "--config", "B-F", "--task", "sst2"])
    assert err.value.code == 2
    assert "B-FP" in capsys.readouterr().err


@pytest.mark.parametrize("argv, known", [
    (["run", "--config", "B-FP", "--task", "sst3"], "sst2"),
    (["matrix", "--tasks", "sst2,nope", "--configs", "B-FP"], "tiny_shakespeare"),
    (["matrix", "--tasks", "sst2", "--configs", "B-FP,Nope"], "Full-FT"),
])
def test_unknown_task_or_config_names_the_known_ones(capsys, argv, known):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "nope" in message.lower() or "sst3" in message
    assert known in message


def test_unknown_model_is_a_clear_error(capsys, tmp_path):
    code = cli.main(["run", "--config", "B-FP", "--task", "sst2", "--model", str(tmp_path / "no-such-model"),
                     "--results", str(tmp_path / "results")])
    assert code == 2
    assert "gpt2-tiny" in capsys.readouterr().err          # the message says what models are


def test_an_existing_run_folder_is_not_overwritten(capsys, tmp_path):
    run_dir = tmp_path / "results" / "sst2__B-FP"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"old": 1}')
    code = cli.main(["run", "--config", "B-FP", "--task", "sst2", "--results", str(tmp_path / "results")])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == '{"old": 1}'
    code = cli.main(["matrix", "--tasks", "sst2", "--configs", "B-Q4,B-FP", "--results", str(tmp_path / "results")])
    assert code == 2 and (run_dir / "metrics.json").read_text() == '{"old": 1}'


def test_no_subcommand_runs_the_planted_default_job(monkeypatch):
    import trainers.planted
    seen = []
    monkeypatch.setattr(trainers.planted, "main", lambda argv=None: seen.append(argv) or 0)
    assert cli.main([]) == 0
    assert cli.main(["--quick", "--steps", "3"]) == 0
    assert seen == [[], ["--quick", "--steps", "3"]]


def test_plots_subcommand_redraws(monkeypatch, tmp_path, capsys):
    import trainers.plots
    monkeypatch.setattr(trainers.plots, "redraw", lambda results: [results / "loss_curves.png"])
    assert cli.main(["plots", "--results", str(tmp_path)]) == 0
    assert "loss_curves.png" in capsys.readouterr().out


def test_ablate_subcommand_calls_the_ablations(monkeypatch):
    import trainers.ablations
    seen = []
    monkeypatch.setattr(trainers.ablations, "main", lambda argv=None, kind=None: seen.append(argv) or 0)
    assert cli.main(["ablate", "rank", "--task", "planted", "--steps", "5"]) == 0
    assert seen == [["rank", "--task", "planted", "--steps", "5"]]
    with pytest.raises(SystemExit):
        cli.main(["ablate", "width"])
