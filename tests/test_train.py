"""The training loop (trainers/train.py) and its optimizers and schedules (trainers/optim.py).

Tiny seeded models; each property is checked by computing the same thing two ways
(accumulated vs one big batch, paged vs torch AdamW, resumed vs uninterrupted).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lora.layers import LoRALinear
from trainers.optim import PagedAdamW, lr_at
from trainers.train import NonFiniteLossError, TrainConfig, epoch_batches, train

V, D, T = 11, 16, 8


class TinyLM(nn.Module):
    """Embedding -> LoRA(Linear) -> dropout -> head; only the LoRA factors train."""

    def __init__(self, rank=2, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mid = LoRALinear(nn.Linear(D, D), rank=rank, alpha=4)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(D, V)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)
        self.explode_at = None   # forward call number at which the loss turns NaN
        self.calls = 0

    def forward(self, idx, targets=None, attention_mask=None):
        x = self.drop(torch.tanh(self.mid(self.emb(idx))))   # (B, T, D)
        logits = self.head(x)                                # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
            if self.training:
                self.calls += 1
                if self.explode_at is not None and self.calls >= self.explode_at:
                    loss = loss * float("nan")
        return logits, loss


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


def make_data(n=64, seed=1):
    """A learnable task: the label is a fixed permutation of the input token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(7))
    return {"input_ids": x, "labels": perm[x]}


def cfg(**kw):
    base = dict(steps=10, batch_size=8, lr=1e-2, warmup_steps=0, schedule="constant", eval_every=0,
                log_every=0, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class RecordingAllocator:
    """A fake allocator: counts the hooks, records what it sees."""

    def __init__(self, reg=0.0):
        self.reg, self.calls, self.grads, self.grad_norms, self.finished = reg, [], [], [], None
        self.rank_history = []

    def regularization(self, model):
        self.calls.append("reg")
        return self.reg

    def on_step(self, step, model, optimizer):
        self.calls.append(("on_step", step))
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    def after_step(self, step, model, optimizer):
        self.calls.append(("after_step", step))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grad_norms.append(torch.norm(torch.stack([p.grad.norm() for p in params])).item())

    def finish(self, total_steps):
        self.finished = total_steps

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        pass


class GrowingAllocator(RecordingAllocator):
    """Grows the LoRA layer's rank 2 -> 4 after step `at`, carrying Adam moments over."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def after_step(self, step, model, optimizer):
        if step != self.at:
            return
        layer = model.mid
        old = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (layer.lora_A, layer.lora_B)}
        layer.resize(4)
        for p, state in old.items():       # same Parameter objects, new shapes: pad moments with zeros
            for key in ("exp_avg", "exp_avg_sq"):
                new = torch.zeros_like(p)
                idx = (slice(0, 2), slice(None)) if p is layer.lora_A else (slice(None), slice(0, 2))
                new[idx] = state[key]
                optimizer.state[p][key] = new


def test_loop_lowers_the_loss():
    model, data = make_model(), make_data()
    result = train(model, epoch_batches(data, 8), cfg(steps=40, lr=3e-2))
    first, last = result.loss_log[0]["loss"], result.loss_log[-1]["loss"]
    assert last < 0.7 * first
    assert [r["step"] for r in result.loss_log] == list(range(40))
    assert result.final_loss == last
    m = result.metrics
    assert m["trainable_params"] == 2 * 2 * D and m["total_params"] > m["trainable_params"]
    assert m["trainable_pct"] == pytest.approx(100 * m["trainable_params"] / m["total_params"])
    assert m["adapter_bytes"] == 4 * m["trainable_params"]
    assert m["peak_memory_bytes"] > 0 and m["peak_memory_kind"] == "cpu_peak_rss"
    assert m["tokens_per_s"] > 0 and m["examples_per_s"] > 0 and m["wall_time_s"] > 0


def test_base_weights_do_not_move():
    model, data = make_model(), make_data()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, epoch_batches(data, 8), cfg(steps=5))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_grad_accumulation_equals_a_bigger_batch():
    data = make_data(n=32)
    big, small = RecordingAllocator(), RecordingAllocator()
    m1, m2 = make_model(), make_model()
    r1 = train(m1, epoch_batches(data, 8, shuffle=False), cfg(steps=3, batch_size=8), allocator=big)
    r2 = train(m2, epoch_batches(data, 4, shuffle=False), cfg(steps=3, batch_size=4, grad_accum=2),
               allocator=small)
    assert small.calls.count("reg") == 2 * big.calls.count("reg") == 6
    for g1, g2 in zip(big.grads, small.grads):
        for name in g1:
            torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-7)
    for a, b in zip(r1.loss_log, r2.loss_log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for name, p in trainable(m1).items():
        torch.testing.assert_close(p, trainable(m2)[name], rtol=1e-4, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), chunk=st.integers(1, 50),
       wd=st.sampled_from([0.0, 0.1]), steps=st.integers(1, 4))
def test_paged_adamw_equals_torch_adamw(shape, chunk, wd, steps):
    torch.manual_seed(0)
    p1 = nn.Parameter(torch.randn(shape))
    p2 = nn.Parameter(p1.detach().clone())
    ref = torch.optim.AdamW([p1], lr=1e-2, weight_decay=wd, foreach=False)
    paged = PagedAdamW([p2], lr=1e-2, weight_decay=wd, chunk_size=chunk)
    for _ in range(steps):
        g = torch.randn(shape)
        p1.grad, p2.grad = g.clone(), g.clone()
        ref.step()
        paged.step()
        assert torch.equal(p1, p2)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(ref.state[p1][key], paged.state[p2][key])
    assert paged.state[p2]["exp_avg"].device.type == "cpu"


def test_paged_adamw_state_dict_round_trip():
    p = nn.Parameter(torch.randn(5, 3))
    opt = PagedAdamW([p], lr=1e-2, chunk_size=4)
    p.grad = torch.randn(5, 3)
    opt.step()
    q = nn.Parameter(p.detach().clone())
    opt2 = PagedAdamW([q], lr=1e-2, chunk_size=4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))   # as through a file
    g = torch.randn(5, 3)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


def test_training_with_paged_adamw_equals_adamw():
    data = make_data()
    r1 = train(make_model(), epoch_batches(data, 8), cfg(steps=6, weight_decay=0.1))
    r2 = train(make_model(), epoch_batches(data, 8), cfg(steps=6, weight_decay=0.1, paged_adamw=True))
    assert [r["loss"] for r in r1.loss_log] == [r["loss"] for r in r2.loss_log]


class Crash(Exception):
    pass


def crashing(batches, after):
    """batches(epoch) that raises after `after` batches in total (a killed process)."""
    count = [0]

    def wrapped(epoch):
        for batch in batches(epoch):
            if count[0] == after:
                raise Crash()
            count[0] += 1
            yield batch
    return wrapped


@pytest.mark.parametrize("grow", [False, True])
def test_resume_reaches_the_same_losses(tmp_path, grow):
    data = make_data(n=40)   # 5 batches per epoch: the run crosses epochs
    c = cfg(steps=14, checkpoint_every=4, schedule="cosine", warmup_steps=3, weight_decay=0.01)
    alloc = (lambda: GrowingAllocator(at=5)) if grow else (lambda: None)
    full = train(make_model(dropout=0.2), epoch_batches(data, 8), c, out_dir=tmp_path / "a", allocator=alloc())

    with pytest.raises(Crash):   # dies during step 10, after the step-8 checkpoint
        train(make_model(dropout=0.2), crashing(epoch_batches(data, 8), after=10), c,
              out_dir=tmp_path / "b", allocator=alloc())
    resumed_model = make_model(dropout=0.2)
    assert resumed_model.mid.rank == 2
    resumed = train(resumed_model, epoch_batches(data, 8), c, out_dir=tmp_path / "b", resume=True,
                    allocator=alloc())
    assert [r["loss"] for r in resumed.loss_log] == [r["loss"] for r in full.loss_log]
    assert [r["lr"] for r in resumed.loss_log] == [r["lr"] for r in full.loss_log]
    assert resumed_model.mid.rank == (4 if grow else 2)
    assert not list((tmp_path / "b").glob("*.tmp"))    # atomic writes leave no temporaries


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make_model(), epoch_batches(make_data(), 8), cfg(), out_dir=tmp_path, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = make_data()
    model = make_model()
    model.explode_at = 6   # the 6th forward is step 5
    with pytest.raises(NonFiniteLossError, match="step 5") as err:
        train(model, epoch_batches(data, 8), cfg(checkpoint_every=2), out_dir=tmp_path)
    assert err.value.step == 5 and err.value.checkpoint == tmp_path / "checkpoint.pt"
    assert all(torch.isfinite(p).all() for p in model.parameters())   # NaN never reached the weights
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4
    reference = make_model()   # the same run stopped cleanly after 4 steps
    train(reference, epoch_batches(data, 8), cfg(steps=4))
    for name, value in trainable(reference).items():
        assert torch.equal(state["trainable"][name], value)


def test_allocator_hooks_are_called_in_order():
    alloc = RecordingAllocator()
    train(make_model(), epoch_batches(make_data(), 8), cfg(steps=4, grad_accum=2), allocator=alloc)
    expected = []
    for step in range(4):
        expected += ["reg", "reg", ("on_step", step), ("after_step", step)]
    assert alloc.calls == expected
    assert alloc.finished == 4
    assert all(g is not None for grads in alloc.grads for g in grads.values())


def test_allocator_regularization_enters_the_gradient():
    model = make_model()
    alloc = RecordingAllocator()
    alloc.regularization = lambda m: 10.0 * (m.mid.lora_A ** 2).sum()
    plain = RecordingAllocator()
    train(model, epoch_batches(make_data(), 8), cfg(steps=1), allocator=alloc)
    train(make_model(), epoch_batches(make_data(), 8), cfg(steps=1), allocator=plain)
    A0 = make_model().mid.lora_A.detach()
    # d/dA of 10 * ||A||^2 is 20 A; the task gradient of A is zero at init (B = 0)
    torch.testing.assert_close(alloc.grads[0]["mid.lora_A"] - plain.grads[0]["mid.lora_A"], 20 * A0)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_clipping_bounds_the_gradient_norm(clip):
    alloc = RecordingAllocator()
    train(make_model(), epoch_batches(make_data(), 8), cfg(steps=4, clip=clip), allocator=alloc)
    if clip:
        assert max(alloc.grad_norms) <= clip * (1 + 1e-4)
    else:
        assert max(alloc.grad_norms) > 1e-2    # the unclipped norms are much larger


def test_schedule_values():
    lr, total, warm = 1.0, 22, 5          # decay over steps 5..21: 16 intervals
    at = [lr_at(s, lr=lr, total_steps=total, warmup_steps=warm, schedule="cosine", min_lr_ratio=0.1)
          for s in range(total)]
    assert at[:warm] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert at[warm] == pytest.approx(1.0)
    assert at[-1] == pytest.approx(0.1)                       # ends at min_lr
    assert at[warm + 7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / 16)))
    assert at[13] == pytest.approx(0.55)                       # half way through the decay: (lr + min) / 2
    assert all(a >= b for a, b in zip(at[warm:], at[warm + 1:]))
    lin = [lr_at(s, lr=lr, total_steps=total, warmup_steps=warm, schedule="linear", min_lr_ratio=0.0)
           for s in range(total)]
    assert lin[13] == pytest.approx(0.5) and lin[-1] == pytest.approx(0.0)
    assert lr_at(17, lr=lr, total_steps=total, warmup_steps=warm, schedule="constant") == lr
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, lr=lr, total_steps=total, schedule="step")


def test_hf_schedules_warm_up_from_zero_and_decay_to_zero():
    """cosine_hf / linear_hf are transformers' get_cosine/linear_schedule_with_warmup, to the formula:
    lr t / W in the warm-up (0 at step 0), then lr 0.5 (1 + cos(pi p)) or lr (1 - p), p = (t - W) / (T - W)."""
    lr, total, warm = 2.0, 20, 4
    cos = [lr_at(t, lr=lr, total_steps=total, warmup_steps=warm, schedule="cosine_hf") for t in range(total)]
    lin = [lr_at(t, lr=lr, total_steps=total, warmup_steps=warm, schedule="linear_hf") for t in range(total)]
    for t in range(total):
        p = (t - warm) / (total - warm)
        want_cos = lr * t / warm if t < warm else lr * 0.5 * (1 + math.cos(math.pi * p))
        want_lin = lr * t / warm if t < warm else lr * (1 - p)
        assert cos[t] == pytest.approx(want_cos, abs=1e-12) and lin[t] == pytest.approx(want_lin, abs=1e-12)
    assert cos[0] == 0.0 and cos[warm] == lr and cos[-1] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_at(0, lr=lr, total_steps=total, warmup_steps=warm, schedule="cosine") == lr / warm   # the old default
    assert TrainConfig(schedule="cosine_hf").schedule == "cosine_hf"


@pytest.mark.ref
def test_hf_schedules_match_transformers():
    transformers = pytest.importorskip("transformers")
    total, warm, lr = 30, 6, 1e-3
    for name, make in (("cosine_hf", transformers.get_cosine_schedule_with_warmup),
                       ("linear_hf", transformers.get_linear_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = make(opt, num_warmup_steps=warm, num_training_steps=total)
        theirs = []
        for _ in range(total):
            theirs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = [lr_at(t, lr=lr, total_steps=total, warmup_steps=warm, schedule=name) for t in range(total)]
        assert ours == pytest.approx(theirs, abs=1e-15), name


def test_loop_uses_the_schedule():
    c = cfg(steps=12, warmup_steps=3, schedule="cosine", lr=1e-2)
    result = train(make_model(), epoch_batches(make_data(), 8), c)
    assert [r["lr"] for r in result.loss_log] == [
        lr_at(s, lr=1e-2, total_steps=12, warmup_steps=3, schedule="cosine", min_lr_ratio=c.min_lr_ratio)
        for s in range(12)]


def test_evaluate_is_called_when_due_and_at_the_end():
    seen = []

    def evaluate(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return {"accuracy": 0.5}

    result = train(make_model(), epoch_batches(make_data(), 8), cfg(steps=10, eval_every=4), evaluate=evaluate)
    assert [e["step"] for e in result.eval_log] == [0, 4, 8, 10]
    assert all(s == (False, False) for s in seen)
    assert result.metrics["accuracy"] == 0.5


def test_bad_config_and_no_trainable_parameters():
    with pytest.raises(ValueError, match="schedule"):
        train(make_model(), epoch_batches(make_data(), 8), cfg(schedule="warm"))
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, epoch_batches(make_data(), 8), cfg())


def test_gradient_checkpointing_gives_the_same_training():
    from trainers.models import GPT2Config, build_model
    from lora.model import add_lora_to_model
    x = torch.randint(0, 97, (32, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = add_lora_to_model(build_model("gpt2", GPT2Config.tiny()), target_modules=["c_attn"], r=4)
        result = train(model, epoch_batches({"input_ids": x, "labels": x}, 8), cfg(steps=4, grad_checkpointing=ckpt))
        losses.append([r["loss"] for r in result.loss_log])
        assert model.config.gradient_checkpointing is ckpt
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# ----------------------------------------------------------------------------- resume: all-or-nothing

def _grown_checkpoint(folder):
    """A finished run whose LoRA layer grew 2 -> 4; its checkpoint.pt holds rank 4."""
    train(make_model(), epoch_batches(make_data(), 8), cfg(steps=6, checkpoint_every=3), out_dir=folder,
          allocator=GrowingAllocator(at=1))
    return folder / "checkpoint.pt"


def test_resume_into_a_model_whose_adapters_differ_changes_nothing(tmp_path):
    from tests.snapshot import assert_unchanged, snapshot
    _grown_checkpoint(tmp_path)
    model = make_model()
    model.head = LoRALinear(model.head, rank=2, alpha=4)     # one more adapter than the checkpoint's run
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"checkpoint\.pt'?: the model has an adapter 'head' \(LoRALinear\) "
                                         r"that the checkpoint lacks"):
        train(model, epoch_batches(make_data(), 8), cfg(steps=6), out_dir=tmp_path, resume=True,
              allocator=GrowingAllocator(at=1))
    assert_unchanged(before, model)                           # mid was not resized to 4 first
    assert model.mid.rank == 2


def test_resume_refuses_trainable_parameters_of_another_shape_before_resizing(tmp_path):
    from tests.snapshot import assert_unchanged, snapshot
    path = _grown_checkpoint(tmp_path)
    state = torch.load(path, weights_only=False)
    state["trainable"]["mid.lora_A"] = torch.zeros(4, D + 1)   # in_features disagree at the saved rank
    torch.save(state, path)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"trainable\['mid.lora_A'\] has shape \(4, 17\), "
                                         r"the model's is \(4, 16\)"):
        train(model, epoch_batches(make_data(), 8), cfg(steps=6), out_dir=tmp_path, resume=True,
              allocator=GrowingAllocator(at=1))
    assert_unchanged(before, model)


def test_resume_failing_at_the_last_moment_is_undone(tmp_path, monkeypatch):
    import trainers.resume as train_module
    from tests.snapshot import assert_unchanged, snapshot
    _grown_checkpoint(tmp_path)
    model = make_model()
    before, rng = snapshot(model), torch.get_rng_state()
    real, calls = train_module._set_rng_state, []

    def flaky(state):                       # the RNG is restored last: fail there, after everything else
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        real(state)
    monkeypatch.setattr(train_module, "_set_rng_state", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        train_module._load_checkpoint(tmp_path / "checkpoint.pt", model, GrowingAllocator(at=1), None, cfg(steps=6))
    assert_unchanged(before, model)         # back at rank 2, same Parameter objects and values
    assert torch.equal(torch.get_rng_state(), rng)
    monkeypatch.setattr(train_module, "_set_rng_state", real)
    train_module._load_checkpoint(tmp_path / "checkpoint.pt", model, GrowingAllocator(at=1), None, cfg(steps=6))
    assert model.mid.rank == 4


def test_resume_refuses_an_adapter_of_another_method(tmp_path):
    from lora.hira import HiRALinear
    train(make_model(), epoch_batches(make_data(), 8), cfg(steps=2, checkpoint_every=1), out_dir=tmp_path)
    model = make_model()
    model.mid = HiRALinear(model.mid.base_layer, rank=2, alpha=4)   # same parameter names and shapes
    with pytest.raises(ValueError, match="adapter 'mid' is a LoRALinear in the checkpoint, a HiRALinear in the "
                                         "model"):
        train(model, epoch_batches(make_data(), 8), cfg(steps=2), out_dir=tmp_path, resume=True)


def test_resume_with_or_without_an_allocator_must_match_the_run(tmp_path):
    _grown_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="written with an allocator, the run resumes without one"):
        train(make_model(), epoch_batches(make_data(), 8), cfg(steps=6), out_dir=tmp_path, resume=True)


@pytest.mark.parametrize("damage", ["empty", "truncated", "not_a_checkpoint", "text"])
def test_damaged_checkpoints_are_value_errors_naming_the_file(tmp_path, damage):
    path = _grown_checkpoint(tmp_path)
    raw = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "not_a_checkpoint":
        torch.save({"step": 3}, path)
    else:
        path.write_text("step,loss\n1,2.0\n")
    model = make_model()
    with pytest.raises(ValueError, match=r"resume: .*checkpoint\.pt.*(empty|truncated|not a training checkpoint)"):
        train(model, epoch_batches(make_data(), 8), cfg(steps=6), out_dir=tmp_path, resume=True,
              allocator=GrowingAllocator(at=1))
    assert model.mid.rank == 2


# ----------------------------------------------------------------------------- models that are not ours

class Output:
    """What a transformers ModelOutput offers train(): attributes, no tuple."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class HFStyle(nn.Module):
    """TinyLM behind a transformers-style call: `labels=` in, an object with `.loss` out."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits, loss = self.inner(input_ids, labels, attention_mask)
        return Output(loss=loss, logits=logits)


class HFStyleSpans(nn.Module):
    """A transformers QA-style call: start_positions/end_positions, start/end logits, no `.logits`."""

    def __init__(self):
        super().__init__()
        self.qa = nn.Linear(D, 2)
        self.emb = nn.Embedding(V, D)

    def forward(self, input_ids, attention_mask=None, start_positions=None, end_positions=None):
        start, end = self.qa(self.emb(input_ids)).unbind(-1)  # (B, T) each
        loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return Output(loss=loss, start_logits=start, end_logits=end)


def test_transformers_style_models_train_like_ours():
    """Two ways: TinyLM called with targets= returning (logits, loss), and the same model behind
    labels= returning an object with .loss: the same losses, step by step."""
    data = make_data()
    ours = train(make_model(), epoch_batches(data, 8, seed=0), cfg(steps=4))
    theirs = train(HFStyle(make_model()), epoch_batches(data, 8, seed=0), cfg(steps=4))
    assert [r["loss"] for r in theirs.loss_log] == [r["loss"] for r in ours.loss_log]

    torch.manual_seed(0)
    spans = HFStyleSpans()
    x = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(3))
    labels = torch.stack([x.argmax(1), x.argmin(1)], dim=1)  # (B, 2) = (start, end), as trainers.data makes them
    before = spans.qa.weight.detach().clone()
    result = train(spans, epoch_batches({"input_ids": x, "labels": labels}, 8, seed=0), cfg(steps=3))
    assert all(math.isfinite(r["loss"]) for r in result.loss_log)
    assert not torch.equal(spans.qa.weight, before)


def test_models_that_train_cannot_call_or_read_are_named():
    data = make_data()

    class NoLabels(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return Output(loss=self.w.sum())

    with pytest.raises(TypeError, match=r"NoLabels.forward\(input_ids, attention_mask=None\) takes no labels; "
                                        r"train\(\) calls model\(input_ids, targets=labels"):
        train(NoLabels(), epoch_batches(data, 8), cfg(steps=1))

    class LossFirst(TinyLM):  # transformers' return_dict=False order: (loss, logits)
        def forward(self, idx, targets=None, attention_mask=None):
            logits, loss = super().forward(idx, targets, attention_mask)
            return loss, logits

    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"returned a tuple of 2 whose loss is \(8, 8, 11\)-shaped tensor; "
                                        r"train\(\) needs \(logits, loss\)"):
        train(LossFirst(), epoch_batches(data, 8), cfg(steps=1))

    class NoLoss(HFStyle):  # called with labels= but returns no loss
        def forward(self, input_ids, attention_mask=None, labels=None):
            return Output(loss=None, logits=self.inner(input_ids)[0])

    with pytest.raises(TypeError, match="returned Output whose loss is None"):
        train(NoLoss(make_model()), epoch_batches(data, 8), cfg(steps=1))


@pytest.mark.ref
def test_train_a_transformers_gpt2():
    """A transformers GPT2LMHeadModel (ModelOutput out, labels= in, labels shifted inside)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    x = make_data()["input_ids"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, epoch_batches({"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}, 8,
                                        seed=0), cfg(steps=3, lr=3e-3))
    losses = [r["loss"] for r in result.loss_log]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_resume_of_a_keep_scaling_run_restores_alpha(tmp_path):
    """A controller that lets alpha follow the rank: the resumed run rebuilds the same alphas."""
    from allocation.controller import ControllerConfig, CurvatureRankAllocator
    data = make_data(n=40)
    c = cfg(steps=12, checkpoint_every=4)
    conf = lambda: ControllerConfig(interval=3, warmup=3, r_min=1, r_max=6, rank_step=2, keep_scaling=True)
    full_model = make_model()
    full = train(full_model, epoch_batches(data, 8), c, out_dir=tmp_path / "a",
                 allocator=CurvatureRankAllocator(full_model, conf()))
    assert full_model.mid.rank != 2 and full_model.mid.alpha / full_model.mid.rank == 2.0   # it grew, ratio kept
    with pytest.raises(Crash):
        model = make_model()
        train(model, crashing(epoch_batches(data, 8), after=9), c, out_dir=tmp_path / "b",
              allocator=CurvatureRankAllocator(model, conf()))
    model = make_model()
    resumed = train(model, epoch_batches(data, 8), c, out_dir=tmp_path / "b", resume=True,
                    allocator=CurvatureRankAllocator(model, conf()))
    assert (model.mid.rank, model.mid.alpha) == (full_model.mid.rank, full_model.mid.alpha)
    assert [r["loss"] for r in resumed.loss_log] == [r["loss"] for r in full.loss_log]
