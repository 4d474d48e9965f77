"""`python -m trainers`: help lists the names, unknown names fail with the known ones,
no silent overwrite, dispatch to the default job and the plots (no data needed)."""
import os
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


# ----------------------------------------------------------------------------- faults

def one_error_line(capsys):
    """The command's stderr holds exactly one `error:` line and no traceback; returns it."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("flags, named", [
    (["--steps", "-5"], "TrainConfig.steps"), (["--lr", "nan"], "TrainConfig.lr"),
    (["--lr", "inf"], "TrainConfig.lr"), (["--clip", "nan"], "TrainConfig.clip"),
    (["--device", "tpu"], "TrainConfig.device"), (["--dtype", "fp8"], "TrainConfig.dtype"),
    (["--batch-size", "0"], "TrainConfig.batch_size"), (["--min-lr-ratio", "2"], "TrainConfig.min_lr_ratio"),
    (["--schedule", "warm"], "TrainConfig.schedule"), (["--limit", "0"], "RunSettings.limit"),
    (["--max-length", "0"], "RunSettings.max_length"), (["--name", ".."], "--name"), (["--name", "a/b"], "--name"),
    (["--overwrite", "--resume"], "exclude each other"),
])
@pytest.mark.parametrize("command", ["run", "matrix"])
def test_bad_values_are_one_error_line_and_leave_no_folder(capsys, tmp_path, flags, named, command):
    if command == "matrix" and flags[0] == "--name":
        pytest.skip("matrix names its folders itself")
    names = ["--config", "B-FP", "--task", "sst2"] if command == "run" else ["--tasks", "sst2", "--configs", "B-FP"]
    code = cli.main([command, *names, "--results", str(tmp_path / "results"), *flags])
    assert code == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "results").exists()


def test_folders_that_cannot_be_written_are_one_error_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code = cli.main(["run", "--config", "B-FP", "--task", "sst2", "--results", str(tmp_path / "file" / "results")])
    assert code != 0 and "is a file" in one_error_line(capsys)
    code = cli.main(["plots", "--results", str(tmp_path / "nowhere")])
    assert code == 2 and "nowhere" in one_error_line(capsys)
    if os.geteuid() != 0:                        # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            code = cli.main(["run", "--config", "B-FP", "--task", "sst2", "--results", str(locked)])
            assert code != 0 and "not writable" in one_error_line(capsys)
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o700)


@pytest.mark.parametrize("flags, named", [
    (["--steps", "-5"], "PlantedConfig.steps"), (["--device", "tpu"], "PlantedConfig.device"),
    (["--seed", "-1"], "PlantedConfig.seed"), (["--quick", "--steps", "0"], "PlantedConfig.steps"),
])
def test_the_default_job_with_bad_values_is_one_error_line(capsys, tmp_path, flags, named):
    code = cli.main([*flags, "--out", str(tmp_path / "results")])
    assert code == 2 and named in one_error_line(capsys)
    assert not (tmp_path / "results").exists()


def test_the_default_job_into_a_file_is_one_error_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code = cli.main(["--quick", "--out", str(tmp_path / "file" / "results")])
    assert code != 0 and one_error_line(capsys)


def test_a_failed_default_job_leaves_no_folder(capsys, tmp_path, monkeypatch):
    """The first method's run folder is written, the second fails: nothing stays behind."""
    import trainers.planted as P
    real = P.run_method

    def second_fails(label, *args, **kw):
        if label != "LoRA":
            raise RuntimeError("boom")
        return real(label, *args, **kw)
    monkeypatch.setattr(P, "run_method", second_fails)
    (tmp_path / "results").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--quick", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "results")])
    assert list((tmp_path / "results").iterdir()) == []


@pytest.mark.parametrize("flags, named", [
    (["--ranks", "a,b"], "--ranks"), (["--ranks", "0,4"], "AblationSettings.ranks"),
    (["--steps", "-5"], "AblationSettings.steps"), (["--lr", "nan"], "AblationSettings.lr"),
    (["--full-ft-lr", "inf"], "AblationSettings.full_ft_lr"), (["--device", "tpu"], "AblationSettings.device"),
    (["--task", "nope"], "nope"),
])
def test_ablation_bad_values_are_one_error_line(capsys, tmp_path, flags, named):
    code = cli.main(["ablate", "rank", "--task", "planted", "--out", str(tmp_path / "out"), *flags])
    assert code == 2 and named in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_ablation_into_a_used_folder_is_one_error_line(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.csv").write_text("x")
    code = cli.main(["ablate", "rank", "--task", "planted", "--out", str(tmp_path / "out")])
    assert code == 2 and "already holds results" in one_error_line(capsys)
    (tmp_path / "file").write_text("x")
    code = cli.main(["ablate", "rank", "--task", "planted", "--out", str(tmp_path / "file")])
    assert code == 2 and "not a directory" in one_error_line(capsys)


# ----------------------------------------------------------------------------- resume

TINY_RUN = ["run", "--config", "B-FP", "--task", "sst2", "--model", "gpt2-tiny", "--steps", "6", "--limit", "40",
            "--max-length", "32", "--batch-size", "4", "--eval-examples", "8", "--warmup-steps", "1",
            "--checkpoint-every", "2", "--no-progress", "--device", "cpu"]


def losses(run_dir):
    import csv
    with open(run_dir / "loss_log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_resume_continues_a_killed_run_to_the_same_losses(capsys, tmp_path, monkeypatch, shared_data):
    results = ["--results", str(tmp_path / "results")]
    assert cli.main([*TINY_RUN, "--results", str(tmp_path / "full")]) == 0
    capsys.readouterr()

    import trainers.train
    real_lr_at = trainers.train.lr_at

    def killed_at_step_5(step, **kw):            # after the step-4 checkpoint, as a kill or Ctrl-C would
        if step == 5:
            raise KeyboardInterrupt
        return real_lr_at(step, **kw)
    monkeypatch.setattr(trainers.train, "lr_at", killed_at_step_5)
    assert cli.main([*TINY_RUN, *results]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "step 4 of 6" in err
    monkeypatch.setattr(trainers.train, "lr_at", real_lr_at)
    run_dir = tmp_path / "results" / "sst2__B-FP"
    kept = sorted(p.name for p in run_dir.iterdir())
    assert kept == ["checkpoint.pt", "config.json"]

    assert cli.main([*TINY_RUN, *results]) == 2                       # the refusal names --resume
    assert "--resume" in one_error_line(capsys)
    assert cli.main([*TINY_RUN, *results, "--overwrite"]) == 2       # never deletes the checkpoint
    assert "does not delete a checkpoint" in one_error_line(capsys)
    assert cli.main([*TINY_RUN, *results, "--resume", "--lr", "0.5"]) == 2   # not the run that stopped
    assert "train.lr" in one_error_line(capsys)
    assert sorted(p.name for p in run_dir.iterdir()) == kept

    assert cli.main([*TINY_RUN, *results, "--resume"]) == 0
    assert losses(run_dir) == losses(tmp_path / "full" / "sst2__B-FP")
    assert cli.main([*TINY_RUN, *results, "--resume"]) == 2          # nothing left to resume
    assert "finished" in one_error_line(capsys)


def test_overwrite_says_what_it_replaces(capsys, tmp_path, shared_data):
    results = ["--results", str(tmp_path / "results")]
    assert cli.main([*TINY_RUN, *results]) == 0
    capsys.readouterr()
    assert cli.main([*TINY_RUN, *results, "--overwrite", "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "replacing the finished run" in err and "checkpoint.pt" in err
    assert len(losses(tmp_path / "results" / "sst2__B-FP")) == 4


def test_a_refused_command_can_be_corrected(capsys, tmp_path, shared_data):
    results = ["--results", str(tmp_path / "results")]
    assert cli.main([*TINY_RUN, *results, "--lr", "nan"]) == 2
    one_error_line(capsys)
    assert cli.main([*TINY_RUN, *results]) == 0


def test_matrix_resume_keeps_finished_runs_and_resumes_the_stopped_one(capsys, tmp_path, monkeypatch, shared_data):
    flags = [f for f in TINY_RUN[5:]] + ["--results", str(tmp_path / "results")]
    matrix = ["matrix", "--tasks", "sst2", "--configs", "B-FP,Full-FT", "--no-isolate", *flags]   # monkeypatched here
    import trainers.train
    real_lr_at = trainers.train.lr_at
    calls = []

    def second_run_killed(step, **kw):            # the Full-FT run is killed after its step-4 checkpoint
        calls.append(step)
        if len(calls) > 6 and step == 5:
            raise KeyboardInterrupt
        return real_lr_at(step, **kw)
    monkeypatch.setattr(trainers.train, "lr_at", second_run_killed)
    assert cli.main(matrix) == 130
    monkeypatch.setattr(trainers.train, "lr_at", real_lr_at)
    finished = (tmp_path / "results" / "sst2__B-FP" / "metrics.json").read_bytes()
    assert not (tmp_path / "results" / "sst2__Full-FT" / "metrics.json").exists()
    capsys.readouterr()
    assert cli.main(matrix) == 2 and "--resume" in one_error_line(capsys)
    assert cli.main([*matrix, "--resume"]) == 0
    assert (tmp_path / "results" / "sst2__B-FP" / "metrics.json").read_bytes() == finished   # kept, not rerun
    assert len(losses(tmp_path / "results" / "sst2__Full-FT")) == 6


KILLED_AT_STEP_5 = """
import os, signal, sys
import trainers.__main__ as cli, trainers.train as train
real = train.lr_at
def lr_at(step, **kw):                       # SIGKILL: no handler, no cleanup runs
    if step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(step, **kw)
train.lr_at = lr_at
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_a_real_kill(capsys, tmp_path, shared_data):
    results = ["--results", str(tmp_path / "results")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NANOPEFT_DATA": str(shared_data)}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_5, *TINY_RUN, *results], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    run_dir = tmp_path / "results" / "sst2__B-FP"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["checkpoint.pt", "config.json"]
    assert cli.main([*TINY_RUN, *results, "--resume"]) == 0
    assert cli.main([*TINY_RUN, "--results", str(tmp_path / "full")]) == 0
    assert losses(run_dir) == losses(tmp_path / "full" / "sst2__B-FP")


@pytest.mark.parametrize("flags, named", [
    (["--repeats", "0"], "--repeats"), (["--threads", "-1"], "--threads"), (["--device", "tpu"], "tpu"),
    (["--only", "nope"], "unknown section"), (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/file/bench.json"], "not a directory"),
])
def test_bench_flags_are_checked_before_timing(capsys, tmp_path, flags, named):
    from trainers.bench.__main__ import main as bench
    (tmp_path / "file").write_text("x")
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code = bench([*flags, "--json", str(tmp_path / "out" / "bench.json")] if "--json" not in flags else flags)
    assert code == 2 and named in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_help_explains_each_option_with_its_fields_comment(capsys):
    # --help shows the words each dataclass field is documented with where it is declared.
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS optimizer steps (default 200)" in text
    assert "--clip CLIP max global gradient norm; 0 disables clipping (default 1.0)" in text
    assert "--tinit VALUE AdaLoRA: warm-up steps before pruning; None: 10 % of the steps" in text
    assert "--bits VALUE 4 | 8 | mixed | none | c_attn=8,c_fc=4" in text        # the CLI's text form


# ----------------------------------------------------------------------------- presets

def _matrix_call(monkeypatch, argv):
    """The arguments `matrix` hands to run_matrix (nothing runs)."""
    seen = {}
    def fake_run_matrix(tasks, configs, train_cfg, root, settings, **kw):
        seen.update(tasks=tasks, configs=configs, train=train_cfg, settings=settings, **kw)
        return []
    monkeypatch.setattr(cli, "run_matrix", fake_run_matrix)
    monkeypatch.setattr(cli, "_draw", lambda folder: [])
    assert cli.main(["matrix", *argv]) == 0
    return seen


def test_a_preset_fills_in_the_protocol_and_given_flags_win(monkeypatch, tmp_path):
    from trainers.presets import PRESETS
    preset = PRESETS["real-ranks"]
    seen = _matrix_call(monkeypatch, ["--preset", "real-ranks", "--results", str(tmp_path)])
    assert seen["tasks"] == preset.tasks.split(",") and seen["configs"] == preset.configs.split(",")
    train, settings = seen["train"], seen["settings"]
    assert (train.steps, train.batch_size, train.lr, train.warmup_steps, train.schedule, train.clip) == \
        (600, 16, 3e-3, 30, "cosine_hf", 0.0)
    assert (settings.model, settings.max_length, settings.eval_examples) == ("stories260K", 256, None)
    assert seen["overrides"] == {"target_modules": "all-linear"}
    # anything given on the command line replaces the preset's value, the rest stays
    seen = _matrix_call(monkeypatch, ["--preset", "real-ranks", "--tasks", "wikitext2", "--steps", "7",
                                      "--targets", "q_proj", "--results", str(tmp_path)])
    assert seen["tasks"] == ["wikitext2"] and seen["train"].steps == 7 and seen["train"].lr == 3e-3
    assert seen["overrides"] == {"target_modules": ("q_proj",)}
    # without a preset nothing changes: --tasks is required and the defaults are TrainConfig's
    seen = _matrix_call(monkeypatch, ["--tasks", "sst2", "--results", str(tmp_path)])
    assert seen["train"].steps == TrainConfig().steps and seen["overrides"] == {}


def test_every_preset_names_real_fields_configs_and_tasks():
    from trainers.presets import PRESETS
    for preset in PRESETS.values():
        defaults = cli._preset_defaults(preset)          # ValueError for a name that is no field
        assert set(preset.tasks.split(",")) <= set(TASKS)
        assert set(preset.configs.split(",")) <= set(CONFIGS)
        assert defaults["tasks"] == preset.tasks


def test_an_unknown_preset_is_one_error_line(capsys):
    assert cli.main(["matrix", "--preset", "nope"]) == 2
    assert "known presets: real-ranks" in one_error_line(capsys)


def test_a_preset_builds_what_the_command_line_builds(monkeypatch, tmp_path):
    """Preset.train_config / .experiment (for code: tutorial 9) give the matrix command's values."""
    import dataclasses
    from trainers.configs import get_config
    from trainers.presets import PRESETS
    preset = PRESETS["real-ranks"]
    seen = _matrix_call(monkeypatch, ["--preset", "real-ranks", "--results", str(tmp_path)])
    assert preset.train_config() == seen["train"]
    assert preset.train_config(steps=5).steps == 5
    assert preset.experiment("SADRA") == dataclasses.replace(get_config("SADRA"), **seen["overrides"])
