"""trainers/models/attention.py: the chunked causal attention equals SDPA and the textbook formula
(values, gradients, second derivatives), in every chunking; `attention` takes it only where it
applies; a LLaMA with head size 8 trains to the same losses with it as with SDPA."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import trainers.models.attention as A
from lora import add_lora_to_model
from trainers.models import LlamaConfig, LlamaForCausalLM
from trainers.train import TrainConfig, epoch_batches, train


def _qkv(B, H, nkv, T, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, T, d, dtype=dtype, generator=g).requires_grad_()   # noqa: E731
    return make(H), make(nkv), make(nkv)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(B=st.integers(1, 3), nkv=st.integers(1, 3), G=st.integers(1, 3), T=st.integers(1, 20),
       d=st.integers(1, 8), chunk_floats=st.sampled_from([1, 300, 1 << 16]))
def test_values_and_gradients_equal_sdpa(B, nkv, G, T, d, chunk_floats):
    """chunk_floats 1: one (batch, kv head) pair per chunk; 300: a few, with a shorter last chunk."""
    q, k, v = _qkv(B, G * nkv, nkv, T, d)
    grad_out = torch.randn(B, G * nkv, T, d, dtype=torch.float64)
    results = []
    for fn in (A._ChunkedCausalAttention.apply, _sdpa, A.textbook):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(A, "CHUNK_FLOATS", chunk_floats)
            out = fn(q, k, v)
            results.append([out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)])
    for got, want, textbook in zip(*results):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(textbook, want)


def test_second_derivatives_are_exact():
    """Under create_graph (Hessian-vector products) backward differentiates the textbook formula."""
    q, k, v = _qkv(2, 4, 2, 5, 3)
    assert torch.autograd.gradcheck(A._ChunkedCausalAttention.apply, (q, k, v))
    assert torch.autograd.gradgradcheck(A._ChunkedCausalAttention.apply, (q, k, v))


def test_attention_takes_the_kernel_only_where_it_applies():
    q, k, v = _qkv(2, 8, 4, 64, 8, torch.float32)
    assert A.applies(q, k, v, None, 0.0)
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    assert not A.applies(q, k, v, mask, 0.0)                       # a padding mask: SDPA
    assert not A.applies(q, k, v, None, 0.1)                       # dropout: SDPA
    assert not A.applies(*_qkv(2, 8, 4, 64, 8), None, 0.0)         # float64
    assert not A.applies(*_qkv(2, 8, 4, 64, 16, torch.float32), None, 0.0)   # head size 16
    assert not A.applies(*_qkv(2, 8, 4, 63, 8, torch.float32), None, 0.0)    # short sequence
    assert not A.applies(q[:, :, -1:], k, v, None, 0.0)            # one query, a longer KV cache
    with sdpa_kernel(SDPBackend.MATH):                             # what Hessian probes ask for
        assert not A.applies(q, k, v, None, 0.0)
    assert A.applies(q, k, v, None, 0.0)
    torch.testing.assert_close(A.attention(q, k, v), _sdpa(q, k, v))
    torch.testing.assert_close(A.attention(q, k, v, mask), F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True))


def test_compiled_attention_uses_sdpa_and_matches():
    q, k, v = _qkv(1, 4, 2, 64, 8, torch.float32)
    compiled = torch.compile(A.attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), A.attention(q, k, v))


def _llama(seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.tiny(max_seq_len=128))   # head size 32 / 4 = 8
    add_lora_to_model(model, r=4, lora_alpha=8, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def test_llama_trains_to_the_same_losses_as_with_sdpa(monkeypatch):
    """Five LoRA steps of a tiny LLaMA at T = 64: training and held-out losses, and the gradients
    of the first step, equal those of the same model run with SDPA."""
    assert _llama().config.head_dim == 8
    data = {"input_ids": torch.randint(0, 97, (8, 64), generator=torch.Generator().manual_seed(2))}
    data["labels"] = data["input_ids"]
    held_out = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(3))
    calls = []
    chunked = A._ChunkedCausalAttention.apply
    monkeypatch.setattr(A._ChunkedCausalAttention, "apply", lambda *a: calls.append(1) or chunked(*a))

    def run():
        model = _llama()
        loss = model(held_out, targets=held_out)[1]
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        cfg = TrainConfig(steps=5, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, eval_every=0)
        result = train(model, epoch_batches(data, 4, seed=0), cfg,
                       evaluate=lambda m: {"loss": m(held_out, targets=held_out)[1]})
        return grads, [e["loss"] for e in result.loss_log], result.metrics["loss"]

    grads, losses, held = run()
    assert calls                                                   # the kernel under test ran
    monkeypatch.setattr(A, "MAX_HEAD_DIM", 0)
    calls.clear()
    ref_grads, ref_losses, ref_held = run()
    assert not calls
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert losses == pytest.approx(ref_losses, rel=1e-5) and held == pytest.approx(ref_held, rel=1e-5)
