"""Our adapter files against Hugging Face PEFT, on a tiny random transformers LLaMA, both directions:
patterns, sparse, modules_to_save, biases, refused methods.

(GPT-2, whose projections are transformers' Conv1D, DistilBERT and every method on each
are in tests/test_hf_interop.py.)
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.ref

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora import adapter_layers, add_lora_to_model, load_adapter, save_adapter  # noqa: E402
from lora import LoraConfig as OurConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def idx():
    return torch.randint(0, 61, (2, 7))


def logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits


def perturb(params):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_ours_to_peft(base, idx, tmp_path, method):
    ours = add_lora_to_model(copy.deepcopy(base), OurConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, method=method, rank_pattern={"down_proj": 2},
        alpha_pattern={r"1\.self_attn\.v_proj": 3}))
    perturb([p for _, layer in adapter_layers(ours) for p in layer.adapter_parameters()])
    want = logits(ours, idx)
    assert not torch.allclose(want, logits(base, idx), atol=1e-3)      # the adapters do something
    save_adapter(ours, tmp_path, OurConfig(r=4, lora_alpha=8, target_modules=TARGETS, method=method,
                                           rank_pattern={"down_proj": 2},
                                           alpha_pattern={r"1\.self_attn\.v_proj": 3}))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, idx), want, rtol=1e-4, atol=1e-5)


def test_sparse_loads_in_peft_as_lora(base, idx, tmp_path):
    ours = add_lora_to_model(copy.deepcopy(base), r=4, target_modules=TARGETS, method="sparse")
    perturb([p for _, layer in adapter_layers(ours) for p in layer.adapter_parameters()])
    for _, layer in adapter_layers(ours):
        layer.prune_to(0.5)
    layer = adapter_layers(ours)[0][1]
    layer.prune_ranks(2)                                               # per-layer rank after structured pruning
    want = logits(ours, idx)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, idx), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_to_ours(base, idx, tmp_path, use_dora):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora, rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 5}))
    perturb([p for n, p in theirs.named_parameters() if "lora_" in n])
    want = logits(theirs.eval(), idx)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    layers = dict(adapter_layers(ours))
    assert layers["model.layers.0.self_attn.v_proj"].rank == 2
    assert len(layers) == 2 * len(TARGETS)
    torch.testing.assert_close(logits(ours, idx), want, rtol=1e-4, atol=1e-5)


def test_modules_to_save_both_ways(base, idx, tmp_path):
    config = OurConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours = add_lora_to_model(copy.deepcopy(base), config)
    perturb([p for p in ours.parameters() if p.requires_grad])
    save_adapter(ours, tmp_path / "ours", config)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(theirs, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                     modules_to_save=["lm_head"]))
    perturb([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert back.lm_head.weight.requires_grad
    torch.testing.assert_close(logits(back, idx), logits(theirs.eval(), idx), rtol=1e-4, atol=1e-5)


def test_peft_refuses_our_hira_files(base, tmp_path):
    ours = add_lora_to_model(copy.deepcopy(base), r=2, target_modules=["q_proj"], method="hira")
    save_adapter(ours, tmp_path)
    with pytest.raises(KeyError, match="NANOPEFT_HIRA"):  # PEFT must not load it as plain LoRA
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_both_ways(idx, tmp_path, bias):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      attention_bias=True)
    base = transformers.LlamaForCausalLM(config).eval()
    ours = add_lora_to_model(copy.deepcopy(base), r=2, target_modules=["q_proj"], bias=bias)
    perturb([p for p in ours.parameters() if p.requires_grad])
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(theirs, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], bias=bias))
    perturb([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(back, idx), logits(theirs.eval(), idx), rtol=1e-4, atol=1e-5)

