"""trainers.plan: counts equal real models', activations equal what autograd saves, the
controller cap uses the same accounting, and (slow) the peak is within 15% of measured."""
import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch

from allocation.budget import adapter_cap_from_total, adamw_bytes, training_bytes
from allocation.controller import ControllerConfig, RankController
from lora.model import adapter_layers, count_parameters
from quantization.model import memory_report
from trainers.__main__ import main as cli_main
from trainers.experiments import ExperimentConfig, prepare
from trainers.models import GPT2Config, LlamaConfig, attention, build_model
from trainers.plan import NAMED_MODELS, PlanConfig, meta_model, model_config, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def small(family: str):
    """Three blocks, GQA for LLaMA, widths that tell the terms apart."""
    if family == "gpt2":
        return build_model("gpt2", GPT2Config.tiny(vocab_size=101, n_embd=48, n_head=3, n_layer=3, block_size=32))
    return build_model("llama", LlamaConfig.tiny(vocab_size=101, dim=48, n_heads=6, n_kv_heads=2, hidden_dim=80,
                                                 n_layers=3))


def prepared(model, method: str, rank: int = 4, bits=None):
    exp = ExperimentConfig("t", method="lora" if method == "qlora" else method, r=rank,
                           quant=4 if method == "qlora" else bits,
                           allocation="adalora" if method == "adalora" else "uniform")
    return prepare(model, exp)[0]


def saved_bytes(model, idx) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets=idx)
    return sum(seen.values())


@pytest.mark.parametrize("name, params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                          ("gpt2-xl", 1_557_611_200), ("llama-7b", 6_738_415_616),
                                          ("llama-13b", 13_015_864_320), ("tinyllama", 1_100_048_384)])
def test_named_models_have_the_published_parameter_counts(name, params):
    plan = plan_memory(PlanConfig(model=name, method="full", seq=128))
    assert plan.n_params == params
    assert plan.weights == {"float32 (trained)": 4 * params}
    assert plan.optimizer == 8 * params and plan.gradients == 4 * params


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method, bits", [("lora", None), ("qlora", None), ("dora", 8), ("hira", None),
                                          ("sparse", None), ("adalora", None), ("full", None)])
def test_counts_and_bytes_equal_a_real_prepared_model(family, method, bits):
    model = small(family)
    plan = plan_memory(PlanConfig(model="small", method=method, bits=bits, rank=4, batch=2, seq=24), model)
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model = prepared(model, method, bits=bits)
    trainable, total = count_parameters(model)
    assert plan.n_params == n_total and plan.trainable == trainable
    assert total == n_total + (0 if method == "full" else trainable)      # adapters add parameters
    adapter_bytes = sum(t.numel() * t.element_size() for _, layer in adapter_layers(model)
                        for n, t in [*layer.named_parameters(), *layer.named_buffers()]
                        if not n.startswith("base_layer."))
    assert plan.adapters == adapter_bytes
    stored = memory_report(model).total_bytes          # parameters and packed weights, not adapter buffers
    assert sum(plan.weights.values()) + plan.adapters == stored + adapter_bytes - sum(
        p.numel() * p.element_size() for _, layer in adapter_layers(model) for p in layer.adapter_parameters())
    assert plan.gradients + plan.optimizer == training_bytes(trainable) - 4 * trainable


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method, targets", [("full", ""), ("lora", ""), ("lora", "all"), ("qlora", "all"),
                                             ("dora", ""), ("dora", "all"), ("hira", "all"), ("sparse", ""),
                                             ("adalora", "all")])
def test_activations_equal_what_autograd_saves(family, method, targets):
    model = small(family)
    names = {"gpt2": ["c_attn", "c_proj", "c_fc"],
             "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}[family]
    cfg = PlanConfig(model="small", method=method, rank=4, batch=2, seq=24,
                     target_modules=",".join(names) if targets else "")
    plan = plan_memory(cfg, model)
    exp = ExperimentConfig("t", method="lora" if method == "qlora" else method, r=4,
                           quant=4 if method == "qlora" else None, target_modules=names if targets else None,
                           allocation="adalora" if method == "adalora" else "uniform")
    model = prepare(model, exp)[0].train()
    idx = torch.randint(0, 101, (2, 24))
    assert plan.activations_plain == saved_bytes(model, idx)


@pytest.mark.parametrize("method, targets", [("full", ""), ("lora", ""), ("lora", "all"), ("dora", "all")])
def test_activations_with_the_small_head_attention_kernel(method, targets):
    """On the CPU at head size 8 and T = 64 LLaMA's attention keeps q, k, v only
    (trainers/models/attention.py); the count follows, and on a GPU it would be SDPA's."""
    model = small("llama")
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = PlanConfig(model="small", method=method, rank=4, batch=2, seq=64, device="cpu",
                     target_modules=",".join(names) if targets else "")
    plan = plan_memory(cfg, model)
    assert plan.activations_plain < plan_memory(dataclasses.replace(cfg, device="cuda"), model).activations_plain
    exp = ExperimentConfig("t", method=method, r=4, target_modules=names if targets else None)
    model = prepare(model, exp)[0].train()
    idx = torch.randint(0, 101, (2, 64))
    assert attention.applies(*[torch.zeros(2, h, 64, 8) for h in (6, 2, 2)], None, 0.0)
    assert plan.activations_plain == saved_bytes(model, idx)


def test_checkpointing_paging_and_phases():
    base = PlanConfig(model="llama-7b", method="qlora", rank=16, seq=1024, dtype="bf16")
    plain = plan_memory(base)
    ckpt = plan_memory(PlanConfig(**{**base.__dict__, "grad_checkpointing": True}))
    paged = plan_memory(PlanConfig(**{**base.__dict__, "paged_adamw": True}))
    assert ckpt.activations == plain.activations_checkpointed < plain.activations == ckpt.activations_plain
    assert ckpt.total < plain.total
    assert paged.optimizer == 0 and paged.optimizer_host == plain.optimizer > 0
    assert paged.total == plain.total - plain.optimizer
    assert plain.weights["nf4"] < plain.weights["bf16 (frozen)"] * 8   # 4.13 bits vs 16 on most weights
    full = plan_memory(PlanConfig(model="gpt2-medium", method="full", seq=256))
    assert full.peak_phase == "optimizer step" and full.total == max(full.phases.values())


def test_controller_cap_is_the_controllers_own_accounting():
    model = small("llama")
    budget_plan = plan_memory(PlanConfig(model="small", method="lora", rank=4, batch=2, seq=24), model)
    model = prepared(model, "lora", rank=4)
    ctrl = RankController(model, ControllerConfig(memory_cap_bytes=budget_plan.controller_cap(budget_plan.total)))
    assert ctrl.adapter_bytes() == budget_plan.adapter_training_bytes == ctrl.config.memory_cap_bytes
    new = ctrl.plan({n: float(i) for i, (n, _) in enumerate(ctrl.layers)})   # full: grows only by shrinking
    assert new != ctrl.ranks() and ctrl.planned_bytes(new) <= ctrl.config.memory_cap_bytes
    more = budget_plan.controller_cap(budget_plan.total + 10_000)
    assert more == budget_plan.adapter_training_bytes + 10_000
    with pytest.raises(ValueError, match="leaves nothing for the adapters"):
        budget_plan.controller_cap(budget_plan.total - budget_plan.adapter_training_bytes)
    with pytest.raises(ValueError, match="full fine-tuning"):
        plan_memory(PlanConfig(model="gpt2", method="full", seq=8)).controller_cap(10 ** 12)
    assert adapter_cap_from_total(10, 4) == 6
    assert sum(adamw_bytes(7, "bf16", "float32").values()) == training_bytes(7, "bf16", "float32") == 7 * 12


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown model 'llama-70b'.*llama-7b"):
        plan_memory(PlanConfig(model="llama-70b"))
    with pytest.raises(ValueError, match="--seq 2048 is longer than gpt2's context of 1024"):
        plan_memory(PlanConfig(model="gpt2", seq=2048))
    with pytest.raises(ValueError, match="method must be one of"):
        plan_memory(PlanConfig(method="prefix"))
    with pytest.raises(ValueError, match="bits must be"):
        plan_memory(PlanConfig(method="full", bits=4))
    assert model_config("gpt2-mini", 300)[1].block_size == 300
    assert sum(p.numel() for p in meta_model(*NAMED_MODELS["llama-13b"]).parameters()) == 13_015_864_320


def test_cli_lists_models_and_prints_the_breakdown(capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("llama-7b", "llama-13b", "gpt2-medium", "gpt2-xl", "gpt2-mini"))
    assert cli_main(["plan", "--model", "gpt2-xl", "--method", "lora", "--rank", "8", "--batch", "2",
                     "--seq", "256", "--grad-checkpointing", "--budget-gib", "16"]) == 0
    out = capsys.readouterr().out
    for row in ("weights float32 (frozen)", "adapters (lora, r=8)", "gradients", "optimizer states",
                "activations with checkpointing", "activations without checkpointing", "peak (",
                "memory_cap_bytes under 16.0 GiB"):
        assert row in out
    assert cli_main(["plan", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_readme_quotes_the_current_plan():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"a 7B QLoRA at r=16 \(batch 1 x 512 tokens, bf16\) needs ([\d.]+) GiB", text)
    assert m, "README.md: the 'Will it fit?' sentence is missing"
    plan = plan_memory(PlanConfig(model="llama-7b", method="qlora", rank=16, batch=1, seq=512, dtype="bf16"))
    assert m.group(1) == f"{plan.total / 2 ** 30:.2f}"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures VmHWM through /proc (Linux)")
def test_plan_is_within_15_percent_of_measured_peaks():
    from trainers.plan_check import POINTS, describe, measure
    errors = {}
    for point in POINTS:
        r = measure(point)
        errors[describe(point)] = r["planned"] / r["measured"] - 1
    assert all(abs(e) <= 0.15 for e in errors.values()), errors
