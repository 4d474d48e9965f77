"""Every kind of adapter file the trainers write loads back: each named config of the matrix
(the CLI's `run`), on a float and on a quantized base, and the default job's (planted) 4-bit rows.

A run's folder holds `adapter_config.json` + `adapter_model.safetensors` (run_experiment calls
save_adapter without a config: the model remembers the one prepare() used). Each must load
into a fresh model, quantized as the run's was, and compute what the trained model computes;
a "LORA" file must load in PEFT too (onto the float model holding the dequantized weights).
"""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from lora import load_adapter
from quantization import quantize_model
from quantization.layers import Linear4bit, Linear8bit
from trainers.experiments import CONFIGS, make_evaluator, run_experiment
from trainers.planted import PlantedConfig, PlantedTask, build_planted, experiment_for
from trainers.train import TrainConfig

from test_experiments import synthetic_task, tiny_cls, tiny_lm

ADAPTER_CONFIGS = [name for name, c in CONFIGS.items() if c.method != "full"]


def quantized_like(model: nn.Module, trained: nn.Module) -> nn.Module:
    """`model` (the same float base) with the layers that are 4- or 8-bit in `trained` quantized alike."""
    bits = {name.removesuffix(".base_layer"): 4 if isinstance(m, Linear4bit) else 8
            for name, m in trained.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}
    return quantize_model(model, bits=bits) if bits else model


def dequantized_like(model: nn.Module, trained: nn.Module) -> nn.Module:
    """`model` (the same float base) holding the weights `trained`'s quantized bases stand for."""
    with torch.no_grad():
        for name, m in trained.named_modules():
            if isinstance(m, (Linear4bit, Linear8bit)):
                model.get_submodule(name.removesuffix(".base_layer")).weight.copy_(m.dequantize(torch.float32))
    return model


def train_cfg(steps=4):
    return TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=0, progress=False,
                       device="cpu")


def matrix_run(folder, name, kind):
    """(run folder, trained model, the same float base untrained, inputs) for one named config."""
    task = synthetic_task(kind)
    build = tiny_lm if kind == "lm" else tiny_cls
    model = build()
    run_experiment(CONFIGS[name], model, task, train_cfg(), folder, make_evaluator(task), model_name="gpt2-tiny")
    return folder, model.eval(), build(), torch.tensor(task.eval["input_ids"][:4])


def planted_run(folder, label):
    """The same for a row of `python -m trainers` (the planted benchmark: qlora/, draftq/), whose
    4-bit base has bias-free blocks: their wrappers hold adapters only."""
    cfg = PlantedConfig.quick(dim=16, planted=((4, 2), (0, 8)), steps=4, batch_size=16, eval_examples=64,
                              calibration_batches=1, device="cpu")
    base, teacher, _ = build_planted(cfg)
    task = PlantedTask(teacher, cfg, batches_per_epoch=4)
    model = copy.deepcopy(base)
    run_experiment(experiment_for(label, cfg), model, task, dataclasses.replace(train_cfg(), batch_size=16),
                   folder, task.evaluate, budget_rank=cfg.budget_rank, model_name="planted")
    return folder, model.eval(), base, task.eval_x[:8]


RUNS = [(n, "lm") for n in ADAPTER_CONFIGS] + [("B-Q4", "classification"), ("QLoRA", "planted"),
                                               ("DRaFT-Q", "planted")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, kind in RUNS:
        folder = root / f"{kind}-{name}"
        made[name, kind] = planted_run(folder, name) if kind == "planted" else matrix_run(folder, name, kind)
    return made


@pytest.mark.parametrize("name,kind", RUNS)
def test_every_run_writes_a_file_that_loads(runs, name, kind):
    folder, trained, base, inputs = runs[name, kind]
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == (["score"] if kind == "classification" else None)
    with torch.no_grad():
        loaded = load_adapter(quantized_like(copy.deepcopy(base), trained), folder)
        assert torch.equal(loaded(inputs)[0], trained(inputs)[0])


@pytest.mark.ref
@pytest.mark.parametrize("name,kind", [r for r in RUNS if r[0] not in ("B-Ada", "Joint-1", "Joint-2", "HiRA")])
def test_peft_loads_every_lora_run_file(runs, name, kind):
    peft = pytest.importorskip("peft")
    folder, trained, base, inputs = runs[name, kind]
    want = "IA3" if CONFIGS.get(name) is not None and CONFIGS[name].method == "ia3" else "LORA"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == want
    theirs = peft.PeftModel.from_pretrained(dequantized_like(copy.deepcopy(base), trained), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(inputs)[0], trained(inputs)[0], rtol=1e-4, atol=1e-5)
