"""Named adapters, their combinations, mixed batches and IA3 against Hugging Face PEFT, on a tiny
random transformers LLaMA: several adapters saved as PEFT lays them out load in PEFT with the
same logits per adapter, and the reverse; add_weighted_adapter and mixed batches agree with PEFT's."""
import copy

import pytest
import torch

pytestmark = pytest.mark.ref

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora import (IA3Config, LoraConfig, add_adapter, add_ia3_to_model,  # noqa: E402
                  add_weighted_adapter, list_adapters, load_adapter, load_adapters, mixed_batch, save_adapter,
                  save_adapters, set_adapter)
from tests.adapters import randomize_adapters  # noqa: E402
from tests.hf_tiny import logits, tiny_llama  # noqa: E402

CONFIGS = {"default": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
           "sst": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
           "news": LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj"], method="dora")}


@pytest.fixture(scope="module")
def base():
    return tiny_llama(transformers)


@pytest.fixture
def idx():
    return torch.randint(0, 61, (3, 7))


def ours_with_adapters(base, configs=CONFIGS):
    model = copy.deepcopy(base)
    for i, (name, config) in enumerate(configs.items()):
        add_adapter(model, name, config)
        set_adapter(model, name)
        torch.manual_seed(i + 1)
        randomize_adapters(model, 0.2)
    return model


def peft_from_folder(base, folder, names):
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    for name in names:
        if name != "default":
            theirs.load_adapter(str(folder / name), adapter_name=name)
    return theirs


def test_our_adapters_load_in_peft_each_with_the_same_logits(base, idx, tmp_path):
    ours = ours_with_adapters(base)
    save_adapters(ours, tmp_path)
    theirs = peft_from_folder(base, tmp_path, CONFIGS)
    for name in CONFIGS:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(logits(theirs, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)


def test_peft_adapters_load_here_each_with_the_same_logits(base, idx, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"], use_dora=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapters(copy.deepcopy(base), tmp_path)
    assert sorted(list_adapters(ours)) == ["default", "other"]
    for name in ("default", "other"):
        theirs.set_adapter(name)
        set_adapter(ours, name)
        torch.testing.assert_close(logits(ours, idx), logits(theirs.eval(), idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combination, rank", [("linear", None), ("cat", None), ("svd", 3)])
def test_weighted_adapters_agree_with_peft(base, idx, tmp_path, combination, rank):
    configs = {"default": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "sst": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])}
    ours = ours_with_adapters(base, configs)
    save_adapters(ours, tmp_path)
    theirs = peft_from_folder(base, tmp_path, configs)
    weights = [0.8, -0.5]
    add_weighted_adapter(ours, list(configs), weights, "mix", combination=combination, svd_rank=rank)
    theirs.add_weighted_adapter(list(configs), weights, "mix", combination_type=combination, svd_rank=rank)
    set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    torch.testing.assert_close(logits(ours, idx), logits(theirs, idx), rtol=1e-4, atol=1e-5)
    save_adapter(ours, tmp_path / "ours_mix", adapter="mix")     # and the combined adapter's file loads in PEFT
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours_mix")).eval()
    torch.testing.assert_close(logits(again, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)


def test_mixed_batch_agrees_with_peft_adapter_names(base, idx, tmp_path):
    configs = {"default": CONFIGS["default"], "sst": CONFIGS["sst"]}
    ours = ours_with_adapters(base, configs)
    save_adapters(ours, tmp_path)
    theirs = peft_from_folder(base, tmp_path, configs)
    names = ["sst", "__base__", "default"]
    with mixed_batch(ours, names):
        want = logits(ours, idx)
    torch.testing.assert_close(logits(theirs, idx, adapter_names=names), want, rtol=1e-4, atol=1e-5)


IA3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def perturb_ia3(model):
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn_like(p) * 0.3)


def test_our_ia3_loads_in_peft_with_the_same_logits(base, idx, tmp_path):
    ours = add_ia3_to_model(copy.deepcopy(base), IA3Config(**IA3))
    perturb_ia3(ours)
    want = logits(ours, idx)
    assert not torch.allclose(want, logits(base, idx), atol=1e-3)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, idx), want, rtol=1e-4, atol=1e-5)


def test_peft_ia3_loads_here_with_the_same_logits(base, idx, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**IA3))
    perturb_ia3(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, idx), logits(theirs.eval(), idx), rtol=1e-4, atol=1e-5)
