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
from tests.hf_tiny import logits, tiny_llama, tiny_llama_config  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(transformers)


@pytest.fixture
def idx():
    return torch.randint(0, 61, (2, 7))


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
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs", is_trainable=True)
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
    base = transformers.LlamaForCausalLM(tiny_llama_config(transformers, 1, attention_bias=True)).eval()
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


def test_peft_loads_our_qlora_file(base, idx, tmp_path):
    """An adapter trained on our 4-bit base, saved without a config: PEFT loads it (no wrapper module
    taken for a module to save) onto the float model holding the dequantized weights, same logits."""
    from quantization import Linear4bit, quantize_model
    with pytest.warns(UserWarning, match="left in float: lm_head"):
        qmodel = quantize_model(copy.deepcopy(base), bits=4)
    ours = add_lora_to_model(qmodel, r=4, target_modules=TARGETS)
    perturb([p for _, layer in adapter_layers(ours) for p in layer.adapter_parameters()])
    save_adapter(ours, tmp_path)
    dequantized = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                dequantized.get_submodule(name.removesuffix(".base_layer")).weight.copy_(module.dequantize())
    theirs = peft.PeftModel.from_pretrained(dequantized, str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)


def seq_cls_model(family):
    torch.manual_seed(0)
    if family == "distilbert":   # head: pre_classifier + classifier
        config = transformers.DistilBertConfig(vocab_size=61, dim=16, hidden_dim=24, n_layers=1, n_heads=2,
                                               max_position_embeddings=32, num_labels=3)
        return transformers.DistilBertForSequenceClassification(config).eval(), ["q_lin", "v_lin"], "classifier"
    config = tiny_llama_config(transformers, 1, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval(), ["q_proj", "v_proj"], "score"


@pytest.mark.parametrize("family", ["distilbert", "llama"])
def test_sequence_classification_adapters_both_ways(idx, tmp_path, family):
    """PEFT's SEQ_CLS adapters list modules_to_save ["classifier", "score"] and select by name suffix
    ("classifier" takes DistilBERT's pre_classifier too): they load here, and ours load there."""
    base, targets, head = seq_cls_model(family)
    idx = idx.clamp(min=1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=targets,
                                                                     task_type="SEQ_CLS"))
    perturb([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(back, idx), logits(theirs.eval(), idx), rtol=1e-4, atol=1e-5)

    ours = add_lora_to_model(copy.deepcopy(base), r=2, target_modules=targets, modules_to_save=[head])
    perturb([p for p in ours.parameters() if p.requires_grad])
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(again, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)


def test_peft_config_objects_are_converted(base, idx, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, rank_pattern={"v_proj": 2},
                             alpha_pattern={"down_proj": 5}, modules_to_save=["lm_head"])
    ours = add_lora_to_model(copy.deepcopy(base), config)
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    want = {n.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
            for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n: (layer.rank, layer.alpha) for n, layer in adapter_layers(ours)} == want
    assert all(type(layer).__name__ == "DoRALinear" for _, layer in adapter_layers(ours))
    perturb([p for p in ours.parameters() if p.requires_grad])
    save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, idx), logits(ours, idx), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"field layers_to_transform=\[0\] is not supported"):
        add_lora_to_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, layers_to_transform=[0]))
    with pytest.raises(ValueError, match="peft_type 'IA3'"):
        add_lora_to_model(copy.deepcopy(base), peft.IA3Config(target_modules=TARGETS))
