"""resize(new_rank): output unchanged, same Parameter objects, old entries kept, shrink = best rank-k."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from lora import DoRALinear, HiRALinear, LoRALinear, SparseLoRALinear, lora_scaling, resized_low_rank

KINDS = {"lora": LoRALinear, "sparse": SparseLoRALinear, "hira": HiRALinear, "dora": DoRALinear}
kinds = st.sampled_from(sorted(KINDS))


def trained(kind, d_in, d_out, rank, alpha=8.0, true_rank=None, rslora=False, seed=0):
    """A layer whose update is nonzero; with true_rank, B A has exactly that rank."""
    torch.manual_seed(seed)
    layer = KINDS[kind](nn.Linear(d_in, d_out), rank=rank, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
        if true_rank is not None:
            layer.lora_B[:, true_rank:] = 0
        if kind == "dora":
            layer.lora_magnitude.mul_(1.5)
    return layer


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=kinds, d_in=st.integers(1, 20), d_out=st.integers(1, 20), rank=st.integers(1, 6),
       grow=st.integers(1, 6), alpha=st.sampled_from([1.0, 8.0, 6.0]), rslora=st.booleans())
def test_grow_keeps_output_old_entries_and_parameter_objects(kind, d_in, d_out, rank, grow, alpha, rslora):
    layer = trained(kind, d_in, d_out, rank, alpha, rslora=rslora)
    # DoRA divides by ||W0 + s B A||; a row that nearly cancels (2-wide rows, B ~ N(0, 1)) turns the
    # float32 rounding of B's rescale into 1e-4 output changes. In float64 the check is about resize.
    dtype = torch.float64 if kind == "dora" else torch.float32
    layer = layer.to(dtype)
    A_param, B_param = layer.lora_A, layer.lora_B
    A_old, B_old, s_old = A_param.detach().clone(), B_param.detach().clone(), layer.scaling
    x = torch.randn(9, d_in, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.resize(rank + grow)
        y_new = layer(x)
    assert layer.rank == rank + grow
    assert layer.lora_A is A_param and layer.lora_B is B_param       # optimizers keep their references
    assert layer.lora_A.shape == (rank + grow, d_in) and layer.lora_B.shape == (d_out, rank + grow)
    assert layer.scaling == pytest.approx(lora_scaling(alpha, rank + grow, rslora))
    assert torch.equal(layer.lora_A[:rank], A_old)                   # old rows bit-for-bit
    torch.testing.assert_close(layer.lora_B[:, :rank] * layer.scaling, B_old * s_old)
    assert torch.count_nonzero(layer.lora_B[:, rank:]) == 0          # new directions start at zero
    torch.testing.assert_close(y_new, y, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=kinds, d_in=st.integers(3, 20), d_out=st.integers(3, 20), rank=st.integers(2, 6),
       data=st.data())
def test_shrink_is_exact_when_the_update_fits(kind, d_in, d_out, rank, data):
    true_rank = data.draw(st.integers(1, rank - 1), label="true_rank")
    new_rank = data.draw(st.integers(true_rank, rank - 1), label="new_rank")
    layer = trained(kind, d_in, d_out, rank, true_rank=true_rank)
    A_param = layer.lora_A
    x = torch.randn(9, d_in)
    with torch.no_grad():
        y = layer(x)
        layer.resize(new_rank)
        y_new = layer(x)
    assert layer.rank == new_rank and layer.lora_A is A_param
    torch.testing.assert_close(y_new, y, rtol=1e-4, atol=1e-4)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(d_in=st.integers(4, 16), d_out=st.integers(4, 16), rank=st.integers(2, 6), data=st.data())
def test_shrink_keeps_the_best_rank_k_approximation(d_in, d_out, rank, data):
    # at most min(d_in, d_out): beyond it the shrink pads (see the last test of this file)
    new_rank = data.draw(st.integers(1, min(rank - 1, d_in, d_out)), label="new_rank")
    layer = trained("lora", d_in, d_out, rank)
    with torch.no_grad():
        delta = layer.get_delta_weight().double()
        s_old = layer.scaling
        U, S, Vh = torch.linalg.svd(delta)
        best = (U[:, :new_rank] * S[:new_rank]) @ Vh[:new_rank]      # Eckart-Young
        layer.resize(new_rank)
        torch.testing.assert_close(layer.get_delta_weight().double(), best, rtol=1e-4, atol=1e-4)
        # the split of B A = U S V^T: B = U sqrt(S) (s_old / s_new), A = sqrt(S) V^T
        col = layer.lora_B.double().norm(dim=0) * layer.scaling / s_old
        row = layer.lora_A.double().norm(dim=1)
        torch.testing.assert_close(col, row, rtol=1e-4, atol=1e-5)


def test_resized_low_rank_helper_shapes_and_product():
    A, B = torch.randn(3, 7), torch.randn(5, 3)
    A2, B2 = resized_low_rank(A, B, 6)
    assert A2.shape == (6, 7) and B2.shape == (5, 6)
    assert torch.equal(B2 @ A2, B @ A)                               # zero columns add exactly nothing
    A1, B1 = resized_low_rank(A, B, 3)
    assert torch.equal(A1, A) and torch.equal(B1, B)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resize_clears_stale_grads_and_training_continues(kind):
    layer = trained(kind, 6, 5, 3)
    opt = torch.optim.SGD(layer.adapter_parameters(), lr=0.1)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    opt.step()
    layer.resize(5)
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    opt.zero_grad()
    layer(x).sum().backward()                                        # same Parameters, new shapes
    assert layer.lora_A.grad.shape == (5, 6)
    opt.step()


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bad", [0, -1])
def test_resize_bad_rank_and_merged_are_clear_errors(kind, bad):
    layer = trained(kind, 4, 4, 2)
    with pytest.raises(ValueError, match=f"resize: rank must be a positive int, got {bad}"):
        layer.resize(bad)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.resize(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resize_in_half_precision(kind, dtype):
    torch.manual_seed(0)
    layer = KINDS[kind](nn.Linear(8, 6).to(dtype), rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8).to(dtype)
    with torch.no_grad():
        y = layer(x)
        layer.resize(4)
        y_grow = layer(x)
        layer.resize(2)                                              # back to the true rank
        y_back = layer(x)
    assert layer.lora_A.dtype == dtype and y_grow.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    scale = max(1.0, float(y.float().abs().max()))
    assert float((y_grow.float() - y.float()).abs().max()) <= tol * scale
    assert float((y_back.float() - y.float()).abs().max()) <= 3 * tol * scale


def test_shrink_to_more_than_the_smaller_dimension_keeps_the_requested_rank():
    layer = LoRALinear(nn.Linear(3, 5), rank=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 3)
    with torch.no_grad():
        y = layer(x)
        layer.resize(4)                   # product has rank <= 3 < 4: nothing is lost
        assert layer.rank == 4
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_float64_adapters_resize_in_float64(kind):
    # The rescale of B and the shrink SVD once ran in float32 even for float64 factors: a DoRA
    # row that nearly cancels then moved the output by 1e-4 on a grow.
    layer = trained(kind, 2, 3, 3, alpha=1.0, rslora=True).double()
    x = torch.randn(9, 2, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        layer.resize(4)
        torch.testing.assert_close(layer(x), y, rtol=1e-10, atol=1e-10)
        layer.resize(2)                                              # shrink: exact, the product has rank <= 2
        torch.testing.assert_close(layer(x), y, rtol=1e-8, atol=1e-8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64


@settings(max_examples=25, deadline=None, derandomize=True)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), rank=st.integers(1, 15))
def test_product_svd_equals_the_svd_of_the_formed_product(d_in, d_out, rank):
    from lora.base import product_svd
    B, A = torch.randn(d_out, rank, dtype=torch.float64), torch.randn(rank, d_in, dtype=torch.float64)
    U, S, Vh = product_svd(B, A)
    torch.testing.assert_close((U * S) @ Vh, B @ A)                               # same product
    S_ref = torch.linalg.svdvals(B @ A)
    torch.testing.assert_close(S, S_ref[:S.numel()])                             # same spectrum
    assert torch.all(S_ref[S.numel():].abs() < 1e-9)
    torch.testing.assert_close(U.t() @ U, torch.eye(U.shape[1], dtype=torch.float64))  # orthonormal
    torch.testing.assert_close(Vh @ Vh.t(), torch.eye(Vh.shape[0], dtype=torch.float64))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=kinds, d_in=st.integers(3, 20), d_out=st.integers(3, 20), rank=st.integers(2, 6),
       new=st.integers(1, 9), rslora=st.booleans())
def test_keep_scaling_lets_alpha_follow_the_rank(kind, d_in, d_out, rank, new, rslora):
    """keep_scaling: scaling (so the step size under Adam) stays, alpha = its rule at the new rank,
    B is not rescaled when growing, and the output is what a default resize gives."""
    layer = trained(kind, d_in, d_out, rank, alpha=2.0 * rank, rslora=rslora).double()
    twin = trained(kind, d_in, d_out, rank, alpha=2.0 * rank, rslora=rslora).double()
    s_old, B_old = layer.scaling, layer.lora_B.detach().clone()
    x = torch.randn(5, d_in, dtype=torch.float64)
    with torch.no_grad():
        layer.resize(new, keep_scaling=True)
        twin.resize(new)
        y, y_twin = layer(x), twin(x)
    assert layer.scaling == pytest.approx(s_old)
    assert twin.scaling == pytest.approx(lora_scaling(2.0 * rank, new, rslora))
    assert lora_scaling(layer.alpha, new, rslora) == pytest.approx(s_old)
    assert twin.alpha == 2.0 * rank                                  # the default keeps alpha
    if new >= rank:
        assert torch.equal(layer.lora_B[:, :rank], B_old)            # no rescale: nothing to undo
    torch.testing.assert_close(y, y_twin)


def test_keep_scaling_must_be_a_flag_and_a_refused_resize_changes_nothing():
    layer = trained("lora", 6, 5, 3)
    with pytest.raises(TypeError, match="keep_scaling must be True or False"):
        layer.resize(4, keep_scaling="yes")
    assert (layer.rank, layer.alpha) == (3, 8.0)
