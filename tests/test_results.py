"""The files the project writes (trainers/results.py, lora/adapter_io.py's atomic write) and the
checks on configuration values (trainers/config_checks.py): permissions follow the umask, a
killed writer's temporary trips nothing, a bad value is refused by name when a config is built."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from lora.adapter_io import save_adapter
from lora.model import add_lora_to_model
from trainers.ablations import AblationSettings
from trainers.experiments import RunSettings
from trainers.planted import PlantedConfig
from trainers.results import (atomic_torch_save, atomic_write_json, atomic_write_text, check_run_dir, load_runs,
                              run_state, write_summary)
from trainers.train import TrainConfig


@pytest.fixture
def umask():
    """Set a umask for the test, restore the old one after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_get_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_torch_save(tmp_path / "checkpoint.pt", {"x": torch.ones(2)})
    model = add_lora_to_model(nn.Sequential(nn.Linear(4, 4)), target_modules=["0"], r=2)
    save_adapter(model, tmp_path / "adapter")
    files = [tmp_path / "a.txt", tmp_path / "a.json", tmp_path / "checkpoint.pt",
             tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter" / "adapter_model.safetensors"]
    assert {f.name: mode(f) for f in files} == {f.name: 0o666 & ~mask for f in files}


def dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".metrics.json.{dead_pid()}.0123abcd.tmp"      # what a writer killed mid-write leaves
    live = tmp_path / f".metrics.json.{os.getppid()}.0123abcd.tmp"     # a writer that still runs
    other = tmp_path / ".metrics.json.interrupted.tmp"                 # not ours to judge
    for tmp in (stale, live, other):
        tmp.write_text("half")
    atomic_write_json(tmp_path / "metrics.json", {"final_loss": 1.0})
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["metrics.json"]


def test_readers_ignore_temporaries_and_hidden_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.123.0123abcd.tmp").write_text("half")        # a killed writer's leftover
    assert run_state(run) == "empty"
    check_run_dir(run)                                                 # not "already holds a run"
    (tmp_path / ".replaced-1").mkdir()
    (tmp_path / ".replaced-1" / "metrics.json").write_text('{"final_loss": 2.0}')
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text('{"final_loss": 1.0}')
    assert [name for name, _, _ in load_runs(tmp_path)] == ["done"]
    write_summary(tmp_path)
    assert "replaced" not in (tmp_path / "experiment_summary.csv").read_text()


def test_folders_that_cannot_take_a_run_fail_before_anything_is_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_run_dir(tmp_path / "file" / "results" / "run")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_run_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="exclude each other"):
        check_run_dir(tmp_path / "run", overwrite=True, resume=True)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        check_run_dir(tmp_path / "run", resume=True)
    if os.geteuid() != 0:                         # root writes anywhere: the file-path case above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                check_run_dir(locked / "run")
        finally:
            locked.chmod(0o700)


@pytest.mark.parametrize("cls, field, value, expected", [
    (TrainConfig, "steps", -5, "integer >= 1"),
    (TrainConfig, "steps", 2.5, "integer >= 1"),
    (TrainConfig, "lr", math.nan, "finite number >= 0"),
    (TrainConfig, "lr", math.inf, "finite number >= 0"),
    (TrainConfig, "clip", math.nan, "finite number >= 0"),
    (TrainConfig, "weight_decay", -0.1, "finite number >= 0"),
    (TrainConfig, "min_lr_ratio", 2.0, "<= 1"),
    (TrainConfig, "grad_accum", 0, "integer >= 1"),
    (TrainConfig, "eval_every", -1, "integer >= 0"),
    (TrainConfig, "schedule", "warm", "'cosine'"),
    (TrainConfig, "device", "tpu", "cuda:N"),
    (TrainConfig, "dtype", "fp8", "bf16"),
    (RunSettings, "limit", 0, "integer >= 1 or None"),
    (RunSettings, "max_length", 0, "integer >= 1"),
    (RunSettings, "eval_batch_size", -1, "integer >= 1"),
    (PlantedConfig, "steps", -5, "integer >= 1"),
    (PlantedConfig, "lr", math.nan, "finite number"),
    (PlantedConfig, "device", "tpu", "cuda:N"),
    (PlantedConfig, "planted", ((64, 1),), "in \\[0, dim=8\\]"),
    (AblationSettings, "ranks", (4, 0), "integers >= 1"),
    (AblationSettings, "full_ft_lr", math.inf, "finite number"),
    (AblationSettings, "steps", 0, "integer >= 1"),
])
def test_configs_refuse_bad_values_by_name(cls, field, value, expected):
    extra = {"dim": 8, "planted": ((2, 1),)} if cls is PlantedConfig else {}
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}\\b.*expected .*{expected}"):
        cls(**{**extra, field: value})


def test_configs_are_checked_again_when_training_starts():
    from trainers.train import train
    cfg = TrainConfig(device="cpu")
    cfg.clip = math.nan                           # changed after it was built
    with pytest.raises(ValueError, match="TrainConfig.clip"):
        train(nn.Linear(2, 2), lambda epoch: iter([]), cfg)
