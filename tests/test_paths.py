import pytest

from trainers.device import Runtime, parse_dtype, pick_device
from trainers.paths import data_dir, data_file


def test_pick_device_default_is_available():
    device = pick_device()
    assert device.type in {"cuda", "mps", "cpu"}


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("float13")


def test_runtime_cpu_autocast_is_float32():
    rt = Runtime.create("cpu")
    assert rt.device.type == "cpu"
    with rt.autocast():
        pass


def test_data_dir_env_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPEFT_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="NANOPEFT_DATA"):
        data_dir()


def test_data_file_names_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOPEFT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data_file("missing.txt")


def test_shared_data_has_provenance(shared_data):
    assert (shared_data / "PROVENANCE.md").exists()
