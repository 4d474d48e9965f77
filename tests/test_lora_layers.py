"""Adapter layers: init = base, merged = unmerged, gradients, the LoRA formula, dtypes, PiSSA, errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lora import AdapterLayer, DoRALinear, HiRALinear, LoRALinear, SparseLoRALinear, base_weight

KINDS = {"lora": LoRALinear, "sparse": SparseLoRALinear, "hira": HiRALinear, "dora": DoRALinear}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) for "the same function computed two ways", relative to the output's scale.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))          # (in, out)
ranks = st.integers(1, 6)
alphas = st.sampled_from([1.0, 4.0, 16.0, 3.5])
kinds = st.sampled_from(sorted(KINDS))
dtypes = st.sampled_from(DTYPES)
rows = st.sampled_from([1, 3, 40])                                   # 40 >= in: LoRA's fused path


class FakeQuantLinear(nn.Module):
    """A stand-in for quantization's Linear8bit/Linear4bit: packed weights, dequantize(), frozen."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self, dtype=None):
        return (self.qweight.float() * self.scale).to(dtype or torch.float32)

    def forward(self, x):
        return F.linear(x, self.dequantize(x.dtype), self.bias.to(x.dtype))


def perturb(layer, seed=1):
    """Move the adapter away from its init (B = 0, m = ||W0||) so merge tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        if isinstance(layer, DoRALinear):
            layer.lora_magnitude.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude.shape, generator=g))
    return layer


def close(a, b, dtype, scale=None):
    tol = TOL[dtype]
    scale = scale if scale is not None else max(1.0, float(b.float().abs().max()))
    err = float((a.detach().float() - b.detach().float()).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol * scale:.3g} ({dtype})"


def make(kind, d_in, d_out, rank, alpha, dtype=torch.float32, **kw):
    base = nn.Linear(d_in, d_out).to(dtype)
    return KINDS[kind](base, rank=rank, alpha=alpha, **kw), base


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=kinds, shape=shapes, rank=ranks, alpha=alphas, dtype=dtypes, n=rows)
def test_init_output_equals_base(kind, shape, rank, alpha, dtype, n):
    layer, base = make(kind, *shape, rank, alpha, dtype)
    x = torch.randn(n, shape[0]).to(dtype)
    expected = F.linear(x, base.weight, base.bias)
    y = layer(x)
    assert y.dtype == dtype
    if kind == "dora":   # m / ||W0|| = 1 up to rounding of the norm
        close(y, expected, dtype)
    else:                # B = 0: exactly the base
        assert torch.equal(y, expected)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=kinds, shape=shapes, rank=ranks, alpha=alphas, dtype=dtypes, n=rows)
def test_merged_equals_unmerged_and_unmerge_restores(kind, shape, rank, alpha, dtype, n):
    # DoRA divides by ||W0 + s B A|| per row; a 1-3 wide row can cancel to ~0, where any two
    # roundings of m V / ||V|| disagree. Wider rows keep the check about the code, not conditioning.
    assume(kind != "dora" or shape[0] >= 4)
    layer, base = make(kind, *shape, rank, alpha, dtype)
    perturb(layer)
    x = torch.randn(2, n, shape[0]).to(dtype)
    with torch.no_grad():
        y = layer(x)
        W0 = base.weight.clone()
        layer.merge()
        assert layer.merged
        assert not torch.equal(base.weight, W0)
        y_merged = layer(x)
        close(y_merged, y, dtype)
        layer.unmerge()
    assert not layer.merged
    assert torch.equal(base.weight, W0)          # bit-exact restore, every kind (HiRA included)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merged_weight_matches_base_plus_delta(kind):
    layer, base = make(kind, 12, 9, 3, 6.0)
    perturb(layer)
    with torch.no_grad():
        expected = base.weight + layer.get_delta_weight()
        x = torch.randn(5, 12)
        torch.testing.assert_close(layer(x), F.linear(x, expected, base.bias), rtol=1e-5, atol=1e-5)


def test_eval_does_not_merge():
    layer, base = make("lora", 8, 8, 2, 4.0)
    perturb(layer)
    W0 = base.weight.clone()
    layer.eval()
    assert not layer.merged and torch.equal(base.weight, W0)
    layer.merge()
    layer.merge()                                # idempotent
    layer.unmerge()
    assert torch.equal(base.weight, W0)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(kind=kinds, shape=shapes, rank=ranks, n=rows, dtype=dtypes)
def test_only_adapter_parameters_get_gradients(kind, shape, rank, n, dtype):
    layer, base = make(kind, *shape, rank, 8.0, dtype)
    perturb(layer)
    x = torch.randn(n, shape[0]).to(dtype).requires_grad_()
    layer(x).float().square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert not base.weight.requires_grad
    names = {n for n, p in layer.named_parameters() if p.grad is not None}
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude"} if kind == "dora" else set())
    assert names == expected
    assert all(getattr(layer, n).grad.dtype == dtype and torch.isfinite(getattr(layer, n).grad).all()
               for n in expected)
    assert {id(p) for p in layer.adapter_parameters()} == {id(getattr(layer, n)) for n in expected}
    assert x.grad is not None


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shape=shapes, rank=ranks, alpha=alphas, rslora=st.booleans(), n=rows, lead=st.sampled_from([(), (2,)]),
       x_grad=st.booleans())
def test_lora_equals_linear_with_merged_weight_values_and_grads(shape, rank, alpha, rslora, n, lead, x_grad):
    """LoRALinear(x) == F.linear(x, W + s B A, b), and so are the gradients (both forward paths)."""
    d_in, d_out = shape
    layer, base = make("lora", d_in, d_out, rank, alpha, use_rslora=rslora)
    perturb(layer)
    s = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert layer.scaling == pytest.approx(s)
    x = torch.randn(*lead, n, d_in, requires_grad=x_grad)
    g = torch.randn(*lead, n, d_out)
    y = layer(x)
    y.backward(g)
    assert (x.grad is not None) == x_grad

    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_(x_grad)
    y_ref = F.linear(x_ref, base.weight + s * B @ A, base.bias)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    pairs = [(layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad)] + ([(x.grad, x_ref.grad)] if x_grad else [])
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_built_from_sizes_and_pretrained_weight():
    W, b = torch.randn(6, 10), torch.randn(6)
    layer = LoRALinear(10, 6, rank=2, alpha=4, pretrained_weight=W, bias=b)
    assert isinstance(layer.base_layer, nn.Linear)
    assert torch.equal(layer.base_layer.weight, W) and torch.equal(layer.base_layer.bias, b)
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), F.linear(x, W, b))
    no_bias = LoRALinear(10, 6, rank=2, pretrained_weight=W)
    assert no_bias.base_layer.bias is None
    with pytest.raises(ValueError, match=r"pretrained_weight must be .*\(6, 10\).*\(10, 6\)"):
        LoRALinear(10, 6, rank=2, pretrained_weight=W.t())


def test_gaussian_init_statistics():
    layer = LoRALinear(nn.Linear(400, 10), rank=4, init="gaussian")
    assert float(layer.lora_A.detach().std()) == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_kaiming_init_bound():
    layer = LoRALinear(nn.Linear(64, 10), rank=4)
    bound = 1 / math.sqrt(64)                    # kaiming_uniform(a=sqrt 5) on fan_in = in
    amax = float(layer.lora_A.detach().abs().max())
    assert 0.8 * bound < amax <= bound


@settings(max_examples=10, deadline=None, derandomize=True)
@given(shape=st.tuples(st.integers(4, 20), st.integers(4, 20)), rank=st.integers(1, 4), alpha=alphas)
def test_pissa_keeps_output_and_holds_top_singular_directions(shape, rank, alpha):
    d_in, d_out = shape
    base = nn.Linear(d_in, d_out)
    W = base.weight.detach().clone()
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    x = torch.randn(7, d_in)
    y0 = base(x).detach()
    layer = LoRALinear(base, rank=rank, alpha=alpha, init="pissa")
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    top = (U[:, :rank] * S[:rank]) @ Vh[:rank]                          # U_r S_r V_r^T
    torch.testing.assert_close(layer.get_delta_weight().double(), top, rtol=1e-4, atol=1e-5)
    # A's rows span the top right singular vectors; the residual's spectrum is the tail.
    A = layer.lora_A.detach().double()
    if rank < min(shape):
        assert float((A @ Vh[rank:].t()).abs().max()) < 1e-3 * float(A.abs().max())
    S_res = torch.linalg.svdvals(layer.base_layer.weight.double())
    torch.testing.assert_close(S_res[: min(shape) - rank], S[rank:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_in_its_own_dtype_returns_base_dtype(kind):
    base = nn.Linear(10, 7).to(torch.bfloat16)
    layer = KINDS[kind](base, rank=3, alpha=6, dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and base.weight.dtype == torch.bfloat16
    perturb(layer)
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        ref = F.linear(x.float(), base.weight.float() + layer.get_delta_weight().float(), base.bias.float())
    close(y, ref, torch.bfloat16)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_quantized_base_forward_and_clear_merge_error(kind):
    q = FakeQuantLinear(nn.Linear(12, 5))
    layer = KINDS[kind](q, rank=2, alpha=4)
    perturb(layer)
    x = torch.randn(3, 12)
    with torch.no_grad():
        ref = F.linear(x, q.dequantize() + layer.get_delta_weight(), q.bias)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(base_weight(q), q.dequantize())
    with pytest.raises(RuntimeError, match="merge into a quantized base.*FakeQuantLinear.*merge_lora_weights"):
        layer.merge()
    assert not layer.merged


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_bad_rank_is_a_clear_error(kind, rank):
    with pytest.raises(ValueError, match=rf"{KINDS[kind].__name__}: rank must be a positive int, got {rank}"):
        KINDS[kind](nn.Linear(4, 4), rank=rank)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_non_linear_base_is_a_clear_error(kind):
    with pytest.raises(TypeError, match="base_layer must be an nn.Linear.*got Conv1d"):
        KINDS[kind](nn.Conv1d(4, 4, 3), rank=2)
    with pytest.raises(TypeError, match="got ReLU"):
        KINDS[kind](nn.ReLU(), rank=2)


def test_bad_init_and_pissa_on_quantized_base_are_clear_errors():
    with pytest.raises(ValueError, match=r"init must be one of \('kaiming', 'gaussian', 'pissa'\), got 'xavier'"):
        LoRALinear(nn.Linear(4, 4), rank=2, init="xavier")
    with pytest.raises(TypeError, match="pissa.*needs an nn.Linear base or a Conv1D.*got FakeQuantLinear"):
        LoRALinear(FakeQuantLinear(nn.Linear(4, 4)), rank=2, init="pissa")
    with pytest.raises(ValueError, match=r"rank <= min\(out, in\) = 3, got 5"):
        LoRALinear(nn.Linear(3, 8), rank=5, init="pissa")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        LoRALinear(nn.Linear(4, 4), rank=2, dropout=1.5)


def test_dropout_applies_to_the_adapter_path_only():
    layer, base = make("lora", 16, 8, 4, 8.0, dropout=0.5)
    perturb(layer)
    x = torch.randn(64, 16)
    layer.train()
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert not torch.allclose(y_train, y_eval)
    with torch.no_grad():
        ref = F.linear(x, base.weight + layer.get_delta_weight(), base.bias)
    torch.testing.assert_close(y_eval, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 40])                    # _ThinLoRA, _FusedLoRA without the hook
def test_hooks_on_the_base_layer_fire_and_the_output_is_unchanged(rows):
    layer, base = make("lora", 16, 8, 4, 8.0)
    perturb(layer)
    x = torch.randn(rows, 16, requires_grad=True)
    fast = layer(x)
    assert layer._plain(x)
    seen = []
    base.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    assert not layer._plain(x)                               # the textbook path, which calls base_layer
    torch.testing.assert_close(layer(x), fast, rtol=1e-5, atol=1e-5)
    assert seen == [(rows, 8)]


def test_is_an_adapter_layer_with_repr():
    for cls in KINDS.values():
        layer = cls(nn.Linear(4, 3), rank=2, alpha=4)
        assert isinstance(layer, AdapterLayer)
        assert layer.rank == 2 and layer.in_features == 4 and layer.out_features == 3
        assert "rank=2" in repr(layer) and "merged=False" in repr(layer)


def test_dora_norm_is_detached_and_matches_the_materialised_norm():
    layer, base = make("dora", 10, 6, 3, 6.0)
    perturb(layer)
    V = base.weight + (layer.lora_B @ layer.lora_A) * layer.scaling
    torch.testing.assert_close(layer.weight_norm(), V.detach().norm(dim=1), rtol=1e-5, atol=1e-6)
    assert not layer.weight_norm().requires_grad
    # Reference with the paper's detached norm: W' = m V / ||V||.detach()
    x = torch.randn(5, 10)
    g = torch.randn(5, 6)
    layer(x).backward(g)
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    m = layer.lora_magnitude.detach().clone().requires_grad_()
    V = base.weight + (B @ A) * layer.scaling
    F.linear(x, m[:, None] * V / V.norm(dim=1, keepdim=True).detach(), base.bias).backward(g)
    for got, want in ((layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (layer.lora_magnitude.grad, m.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_hira_delta_is_hadamard_with_w0_and_can_be_high_rank():
    layer, base = make("hira", 16, 16, 1, 1.0)
    perturb(layer)
    delta = layer.get_delta_weight()
    torch.testing.assert_close(delta, base.weight * (layer.lora_B @ layer.lora_A) * layer.scaling)
    assert int(torch.linalg.matrix_rank(delta.detach())) > 1      # rank-1 B A, yet delta W is not rank 1


def test_readme_example_runs_and_merge_keeps_the_function():
    """The 'use one layer in your own model' snippet of README.md, run as written."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use one layer in your own model", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert isinstance(model[0], LoRALinear) and model[0].merged
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B"}
    x = torch.randn(3, 512)
    with torch.no_grad():
        y = model(x)
        model[0].unmerge()
        torch.testing.assert_close(model(x), y)


def test_module_device_reads_parameters_then_buffers():
    from lora import module_device
    holder = nn.Module()
    assert module_device(holder) == torch.device("cpu")            # no tensors at all
    holder.register_buffer("packed", torch.zeros(3, dtype=torch.uint8, device="meta"))
    assert module_device(holder) == torch.device("meta")           # buffers only (a packed 4-bit layer)
    holder.weight = nn.Parameter(torch.zeros(2))
    assert module_device(holder) == torch.device("cpu")            # a parameter wins
