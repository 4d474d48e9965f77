"""Our adapters on Hugging Face transformers models, built from tiny configs (no download):
GPT-2 (its projections are `Conv1D`, weight stored (in, out)), LLaMA and DistilBERT.

Every method adapts every model, trains a few steps (only adapter tensors move) and merges
to the same function; LoRA and DoRA files go through PEFT both ways with the same logits;
our from-scratch GPT-2 and HF's exchange adapters; QLoRA composes on HF GPT-2.
"""
import copy
import json
import warnings

import pytest
import torch

pytestmark = pytest.mark.ref

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora import (adapter_layers, add_lora_to_model, load_adapter, merge_adapters, merge_lora_weights,  # noqa: E402
                  save_adapter, unmerge_lora_weights)
from quantization import Linear4bit, quantize_model  # noqa: E402
from trainers.checkpoints import hf_key_map, load_mapped  # noqa: E402
from trainers.models import GPT2Config, GPT2LMHeadModel  # noqa: E402

VOCAB = 100
# method name -> add_lora_to_model options: every adapter kind, and LoRA's rsLoRA and PiSSA variants
METHODS = {"lora": {}, "sparse": {"method": "sparse"}, "hira": {"method": "hira"}, "dora": {"method": "dora"},
           "adalora": {"method": "adalora"}, "rslora": {"use_rslora": True}, "pissa": {"init": "pissa"}}
# model -> (a builder, targets for the PEFT round trip)
GPT2 = dict(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
MODELS = {
    "gpt2-lm": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)),
                ["c_attn", "c_proj", "c_fc"]),
    "gpt2-cls": (lambda: transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**GPT2, num_labels=2)),
                 ["c_attn", "c_proj", "c_fc"]),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
              ["q_proj", "v_proj", "down_proj"]),
    "distilbert-cls": (lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0, num_labels=2)),
                       ["q_lin", "v_lin", "lin1"]),
}


@pytest.fixture(scope="module")
def bases():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return {name: build().eval() for name, (build, _) in MODELS.items()}


@pytest.fixture
def idx():
    return torch.randint(1, VOCAB, (2, 7))


def logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits


def loss_of(model, idx):
    """Next-token loss for a causal LM, cross-entropy on labels (0, 1) for a classifier."""
    labels = idx if hasattr(model, "lm_head") else torch.tensor([0, 1])
    return model(input_ids=idx, labels=labels).loss


def perturb(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_method_adapts_trains_and_merges(bases, idx, name, method):
    model = add_lora_to_model(copy.deepcopy(bases[name]), r=2, target_modules="all-linear", **METHODS[method])
    adapted = dict(adapter_layers(model))
    if name.startswith("gpt2"):   # the Conv1D projections are adapted in place, no copy into a new layout
        conv = adapted["transformer.h.0.attn.c_attn"].base_layer
        assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (32, 96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = loss_of(model, idx)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and moved <= trained                                  # only adapter tensors move
    assert all(".base_layer." not in k for k in trained)
    model.eval()
    perturb([p for _, layer in adapter_layers(model) for p in layer.adapter_parameters()])
    want = logits(model, idx)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapters(model)
    torch.testing.assert_close(logits(model, idx), want, rtol=1e-4, atol=1e-5)
    unmerge_lora_weights(model)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())   # bit-exact
    torch.testing.assert_close(logits(merge_lora_weights(model), idx), want, rtol=1e-4, atol=1e-5)


def peft_warnings(caught):
    return [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ours_to_peft(bases, idx, tmp_path, name, method):
    base, targets = bases[name], MODELS[name][1]
    ours = add_lora_to_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=targets, method=method,
                             rank_pattern={"c_fc|lin1|down_proj": 2})
    perturb([p for _, layer in adapter_layers(ours) for p in layer.adapter_parameters()])
    want = logits(ours, idx)
    assert not torch.allclose(want, logits(base, idx), rtol=1e-2, atol=0)  # the adapters do something
    save_adapter(ours, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["fan_in_fan_out"] is name.startswith("gpt2")          # as PEFT writes it for Conv1D targets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert peft_warnings(caught) == []                                # PEFT found the flag it expects
    torch.testing.assert_close(logits(theirs, idx), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_peft_to_ours(bases, idx, tmp_path, name, use_dora):
    base, targets = bases[name], MODELS[name][1]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, fan_in_fan_out=name.startswith("gpt2"),
        rank_pattern={targets[1]: 2}))
    perturb([p for n, p in theirs.named_parameters() if "lora_" in n])
    want = logits(theirs.eval(), idx)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    assert len(adapter_layers(ours)) == len([n for n, _ in theirs.named_modules() if n.endswith(".lora_A")])
    torch.testing.assert_close(logits(ours, idx), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_our_gpt2_and_hf_gpt2_exchange_adapters(bases, idx, tmp_path, method):
    """The same weights in both (HF's Conv1D (in, out) transposed into our nn.Linear): same logits,
    and an adapter file from either loads into the other (and from PEFT into ours)."""
    hf = bases["gpt2-lm"]
    ours = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    load_mapped(ours, hf.state_dict(), hf_key_map("gpt2", ours.config))
    torch.testing.assert_close(ours(idx)[0], logits(hf, idx), rtol=1e-5, atol=1e-5)
    targets = ["c_attn", "c_proj", "c_fc"]

    from_hf = add_lora_to_model(copy.deepcopy(hf), r=4, target_modules=targets, method=method)
    perturb([p for _, layer in adapter_layers(from_hf) for p in layer.adapter_parameters()])
    save_adapter(from_hf, tmp_path / "hf")
    into_ours = load_adapter(copy.deepcopy(ours), tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(into_ours(idx)[0], logits(from_hf, idx), rtol=1e-4, atol=1e-5)

    from_ours = add_lora_to_model(copy.deepcopy(ours), r=4, target_modules=targets, method=method)
    perturb([p for _, layer in adapter_layers(from_ours) for p in layer.adapter_parameters()], seed=2)
    save_adapter(from_ours, tmp_path / "ours")
    into_hf = load_adapter(copy.deepcopy(hf), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(logits(into_hf, idx), from_ours(idx)[0], rtol=1e-4, atol=1e-5)

    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, target_modules=targets,
                                                                   fan_in_fan_out=True, use_dora=method == "dora"))
    perturb([p for n, p in theirs.named_parameters() if "lora_" in n], seed=3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    from_peft = load_adapter(copy.deepcopy(ours), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(from_peft(idx)[0], logits(theirs.eval(), idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_quantize_hf_gpt2_then_qlora(bases, idx, method):
    hf = bases["gpt2-lm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                # lm_head is tied to wte: left in float
        model = quantize_model(copy.deepcopy(hf), bits=4)
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * 4 and "transformer.h.1.mlp.c_fc" in quantized
    for name in quantized:   # each holds the Conv1D's weight transposed to (out, in), NF4-rounded
        W = hf.get_submodule(name).weight.t()
        err = (model.get_submodule(name).dequantize(torch.float32) - W).abs().max()
        assert err <= 0.2 * W.abs().max()
    model = add_lora_to_model(model, r=2, target_modules="all-linear", method=method)
    assert len(adapter_layers(model)) == 2 * 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
