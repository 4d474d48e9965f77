"""The snapshot helper sees every kind of change an all-or-nothing test must catch."""
import pytest
import torch
import torch.nn as nn

from tests.snapshot import assert_files_unchanged, assert_unchanged, snapshot, snapshot_files


def _model():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 4))
    return model


def test_forward_in_training_mode_changes_buffers():
    model = _model()
    before = snapshot(model)
    model(torch.randn(5, 4))  # training-mode BatchNorm updates its running stats
    with pytest.raises(AssertionError, match=r"buffer '1.running_mean': values changed"):
        assert_unchanged(before, model)
    assert_unchanged(snapshot(model), model)


@pytest.mark.parametrize("change, message", [
    (lambda m: m[0].weight.data.view(-1)[0].add_(1e-7), r"parameter '0.weight': values changed"),
    (lambda m: m[0].weight.requires_grad_(False), r"'0.weight': requires_grad True -> False"),
    (lambda m: m.eval(), r"module '1': training True -> False"),
    (lambda m: m.__setitem__(2, nn.Identity()), r"module '2': type Linear -> Identity"),
    (lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
     r"'0.weight': replaced by another tensor object"),
    (lambda m: setattr(m[0], "in_features", 5), r"module '0': attribute in_features 4 -> 5"),
    (lambda m: setattr(m[0].weight, "grad", torch.zeros(3, 4)), r"'0.weight': .grad set"),
    (lambda m: m[0].weight.data.view(-1)[0].fill_(float("nan")), r"values changed"),
])
def test_each_kind_of_change_is_named(change, message):
    model = _model()
    before = snapshot(model)
    change(model)
    with pytest.raises(AssertionError, match=message):
        assert_unchanged(before, model)


def test_nan_compares_equal_to_itself_and_ties_are_tracked():
    model = _model()
    model[0].weight.data.fill_(float("nan"))
    model[2].weight = nn.Parameter(torch.zeros(4, 3))
    model[0].bias = model[1].weight  # a tie (same shape (3,))
    before = snapshot(model)
    assert_unchanged(before, model)
    model[0].bias = nn.Parameter(model[1].weight.detach().clone())
    with pytest.raises(AssertionError, match="shared tensors differ"):
        assert_unchanged(before, model)


def test_folder_snapshot(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    before = snapshot_files(tmp_path)
    assert_files_unchanged(before, tmp_path)
    (tmp_path / "b.txt").write_text("y")
    (tmp_path / "a.txt").write_text("z")
    with pytest.raises(AssertionError, match=r"b.txt is new\n  a.txt changed"):
        assert_files_unchanged(before, tmp_path)
