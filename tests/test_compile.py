"""torch.compile: every adapter layer, the quantized bases and the three model families compile
whole (fullgraph=True: a graph break is an error) in forward and backward and match eager;
`TrainConfig.compile` trains to the same losses as eager, also while an allocator resizes
layers, and keeps checkpoints and resume as they were; failures are clear errors.

Most tests use backend="aot_eager": dynamo captures the whole graph and AOT autograd builds
the backward, the part where graph breaks and tracing errors live, without generating C++
(seconds per compile with inductor on this 2-core CPU). Inductor itself (it works here: g++
is installed) runs in the tests marked slow.
"""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

from allocation import ControllerConfig, CurvatureRankAllocator
from lora.dora import DoRALinear
from lora.hira import HiRALinear
from lora.layers import LoRALinear
from lora.model import add_lora_to_model
from lora.sparse import SparseLoRALinear
from lora.svd import SVDLoRALinear
from quantization import CompileError, Linear4bit, Linear8bit, compiled_dequantize_nf4, dequantize_nf4, quantize_nf4
from quantization.model import quantize_model
from quantization.nf4 import dequantize_nf4_expression
from tests.test_distributed import build, data
from trainers import compiling
from trainers.models import MODELS, build_model
from trainers.train import CHECKPOINT_NAME, TrainConfig, epoch_batches, train

D = 32


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()        # each test compiles from scratch; no cache limit carried over
    yield
    torch._dynamo.reset()


def _perturbed(module):
    """Nonzero adapter factors (B starts at zero, which would hide half of every gradient)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


LAYERS = {
    "lora-fused": lambda: LoRALinear(nn.Linear(D, D), rank=4),        # 64 rows >= in: the one-matmul path
    "lora-thin": lambda: LoRALinear(nn.Linear(D, 48), rank=4, dropout=0.0),
    "sparse": lambda: SparseLoRALinear(nn.Linear(D, D), rank=4),
    "hira": lambda: HiRALinear(nn.Linear(D, D), rank=4),
    "dora": lambda: DoRALinear(nn.Linear(D, D), rank=4),
    "svd": lambda: SVDLoRALinear(nn.Linear(D, D), rank=4),
    "linear4bit": lambda: Linear4bit.from_linear(nn.Linear(D, 24)),
    "linear8bit": lambda: Linear8bit.from_linear(nn.Linear(D, 24)),
    "lora-on-4bit": lambda: LoRALinear(Linear4bit.from_linear(nn.Linear(D, D)), rank=4),
    "lora-on-4bit-plain-absmax": lambda: LoRALinear(Linear4bit.from_linear(nn.Linear(40, 24), double_quant=False),
                                                    rank=4),
    "dora-on-4bit": lambda: DoRALinear(Linear4bit.from_linear(nn.Linear(D, D)), rank=4),
    "lora-on-8bit": lambda: LoRALinear(Linear8bit.from_linear(nn.Linear(D, D)), rank=4),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_layer_compiles_whole_and_matches_eager(kind):
    """Old code: Linear4bit broke the graph 5 times (storage_offset() in the chunked dequant loop)."""
    torch.manual_seed(0)
    layer = _perturbed(LAYERS[kind]())
    rows = 64 if kind == "lora-fused" else 6
    x = torch.randn(rows, layer.in_features, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    results = []
    for run in (compiled, layer):
        y = run(x)
        y.square().sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        results.append((y.detach(), [g.clone() for g in grads]))
        layer.zero_grad(set_to_none=True)
        x.grad = None
    (y_c, g_c), (y_e, g_e) = results
    torch.testing.assert_close(y_c, y_e)
    assert len(g_c) == len(g_e) >= 1
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


def _family(kind, bits=None):
    torch.manual_seed(0)
    model = build_model(kind, MODELS[kind][0].tiny())
    if bits is not None:
        quantize_model(model, bits=bits)
    add_lora_to_model(model, rank=4, alpha=8, target_modules="all-linear")
    model.train()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids if kind in ("gpt2", "llama") else torch.tensor([0, 1])
    return _perturbed(model), ids, labels, mask


def _model_compiles_like_eager(model, ids, labels, mask, backend="aot_eager"):
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    results = []
    for run in (compiled, model):
        _, loss = run(ids, targets=labels, attention_mask=mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (loss_c, g_c), (loss_e, g_e) = results
    torch.testing.assert_close(loss_c, loss_e)
    assert g_c.keys() == g_e.keys() and any("lora_A" in n for n in g_c)
    for name in g_c:
        torch.testing.assert_close(g_c[name], g_e[name], msg=name)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "distilbert-cls"])
def test_model_families_with_lora_compile_whole_and_match_eager(kind):
    _model_compiles_like_eager(*_family(kind))


@pytest.mark.slow
@pytest.mark.parametrize("kind, bits", [("llama", 4), ("gpt2", 8)])
def test_quantized_model_families_with_lora_compile_whole(kind, bits):
    with pytest.warns(UserWarning, match="left in float"):
        parts = _family(kind, bits)
    _model_compiles_like_eager(*parts)


@pytest.mark.slow
def test_inductor_compiles_a_qlora_model_like_eager():
    """The real backend (C++ code generation) on a QLoRA model, forward and backward."""
    with pytest.warns(UserWarning, match="left in float"):
        parts = _family("gpt2", 4)
    _model_compiles_like_eager(*parts, backend="inductor")


# ----------------------------------------------------------------------------- NF4 dequantization

@pytest.mark.parametrize("shape, blocksize, double_quant, dtype", [
    ((33, 7), 64, True, torch.float32),        # partial last block, odd element count
    ((24, 40), 32, False, torch.float32),
    ((5, 300), 128, True, torch.bfloat16),
    ((600, 1),  64, True, torch.float16),      # more than 256 blocks: two double-quant blocks
])
def test_nf4_expression_equals_the_chunked_dequant(shape, blocksize, double_quant, dtype):
    q = quantize_nf4(torch.randn(shape), blocksize, double_quant)
    assert torch.equal(dequantize_nf4_expression(q, dtype), dequantize_nf4(q, dtype))


def test_compiled_dequantize_nf4_matches_eager():
    q = quantize_nf4(torch.randn(33, 7))
    out = compiled_dequantize_nf4(q, backend="aot_eager")
    torch.testing.assert_close(out, dequantize_nf4(q), rtol=0, atol=1e-7)
    with pytest.raises(TypeError, match="compiled_dequantize_nf4: q must be an NF4Tensor"):
        compiled_dequantize_nf4(torch.zeros(3))


@pytest.mark.slow
def test_compiled_dequantize_nf4_with_inductor_matches_eager():
    for shape in ((64, 48), (33, 7)):
        q = quantize_nf4(torch.randn(shape))
        torch.testing.assert_close(compiled_dequantize_nf4(q, torch.bfloat16), dequantize_nf4(q, torch.bfloat16))


# ----------------------------------------------------------------------------- training with compile=True

@pytest.fixture
def counted(monkeypatch):
    """Train's compile backend replaced by aot_eager behind a counter of compiled graphs."""
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(compiling, "BACKEND", counter)
    return counter


def _train(method, compile, steps=6, allocator=None, **kw):
    model, default = build(method)
    allocator = allocator(model) if allocator is not None else default
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=0, schedule="constant", eval_every=0,
                      device="cpu", progress=False, compile=compile, **{k: v for k, v in kw.items()
                                                                       if k != "out_dir" and k != "resume"})
    result = train(model, epoch_batches(data(), 8, seed=3), cfg, allocator=allocator,
                   out_dir=kw.get("out_dir"), resume=kw.get("resume", False))
    return [r["loss"] for r in result.loss_log], model, allocator


@pytest.mark.parametrize("method", ["lora", "draftq", "adalora", "sparse"])
def test_compiled_training_reaches_the_losses_of_eager(method, counted):
    """draftq resizes layers (recompiles), adalora and sparse mask them (no recompile needed)."""
    eager, model_e, alloc_e = _train(method, compile=False)
    compiled, model_c, alloc_c = _train(method, compile=True)
    assert counted.frame_count >= 1                             # the compiled forward really ran
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    if method == "draftq":
        assert alloc_c.rank_history == alloc_e.rank_history
        assert len({tuple(h["ranks"].values()) for h in alloc_c.rank_history}) > 1      # ranks did move
    for (name, p), (_, q) in zip(model_c.named_parameters(), model_e.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_every_rank_change_gets_a_compiled_graph(counted):
    """Old behaviour (a recompile per guard failure, no reset): after 8 graphs dynamo's recompile
    limit is hit and the rest of the run is eager. Each rank change now compiles anew."""
    config = ControllerConfig(interval=1, r_min=1, r_max=8, rank_step=1)
    _, model, allocator = _train("draftq", compile=True, steps=14,
                                 allocator=lambda m: CurvatureRankAllocator(m, config))
    history = allocator.rank_history
    # a change decided after step s is compiled for at step s + 1 (none after the last step, 13)
    changes = sum(a["ranks"] != b["ranks"] for a, b in zip(history, history[1:]) if b["step"] < 13)
    assert changes > 8                                          # past dynamo's recompile limit
    assert counted.frame_count == changes + 1                   # the first compile, then one per change


def test_compiled_checkpoints_resume_like_an_uninterrupted_run(tmp_path, counted):
    """The model object, not the compiled wrapper, is saved: no `_orig_mod.` keys, and a resumed
    compiled run (with rank changes before and after the stop) continues to the same losses."""
    whole, _, _ = _train("draftq", compile=True, steps=6)
    _train("draftq", compile=True, steps=4, checkpoint_every=2, out_dir=tmp_path)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    keys = [k for k in _all_keys(saved)]
    assert keys and not any("_orig_mod" in k for k in keys)
    resumed, _, _ = _train("draftq", compile=True, steps=6, checkpoint_every=2, out_dir=tmp_path, resume=True)
    assert resumed == pytest.approx(whole, rel=1e-5, abs=1e-6)


def _all_keys(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{prefix}{k}"
            yield from _all_keys(v, f"{prefix}{k}.")


def test_a_failing_backend_is_a_clear_error(monkeypatch):
    """No C++ compiler for inductor (simulated by naming a compiler that does not exist): one
    CompileError naming the option and the way out, not an InductorError from deep inside."""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    with pytest.raises(CompileError, match=r"train: compile=True \(--compile\): torch.compile\(backend='inductor'\) "
                                           r"could not compile: .*C\+\+ compiler.*run without compiling"):
        _train("lora", compile=True, steps=1)


def test_unsupported_cases_are_refused_up_front(monkeypatch):
    with pytest.raises(ValueError, match="runs in one process only"):
        compiling.check_compile(world_size=2)
    with pytest.raises(TypeError, match="TrainConfig.compile must be True or False, got 'yes'"):
        TrainConfig(compile="yes")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(CompileError, match="torch.compile is not supported with Python"):
        _train("lora", compile=True, steps=1)
    with pytest.raises(CompileError, match="compiled_dequantize_nf4: torch.compile is not supported"):
        compiled_dequantize_nf4(quantize_nf4(torch.randn(8, 8)))


@pytest.mark.slow
def test_compiled_training_with_inductor_and_rank_changes_matches_eager():
    eager, _, _ = _train("draftq", compile=False)
    compiled, _, _ = _train("draftq", compile=True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_compile_is_a_command_line_option_with_its_comment(capsys):
    import trainers.__main__ as cli
    from trainers.flags import field_comments
    args = cli.build_parser().parse_args(["run", "--config", "B-FP", "--task", "sst2", "--compile"])
    assert cli.from_args(TrainConfig, args).compile is True
    assert TrainConfig().compile is False
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "--compile, --no-compile" in capsys.readouterr().out
    assert "torch.compile" in field_comments(TrainConfig)["compile"]
