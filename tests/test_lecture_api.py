"""The lecture's code, as readers first meet it, runs as written: `LoRALayer`, the keyword
LoRALinear constructor, quantize_model(method="nf4"), QLoRALinear, lora_state_dict."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.llama import LlamaConfig, LlamaForCausalLM


def test_the_lecture_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    original_layer = nn.Linear(4096, 4096)
    model = LlamaForCausalLM(LlamaConfig.tiny(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64))

    # --- the lecture's lines, as written ---
    from lora import LoRALayer, LoRALinear
    lora_layer = LoRALinear(in_features=4096, out_features=4096, rank=8, alpha=16,
                            pretrained_weight=original_layer.weight)
    from quantization import QLoRALinear, quantize_model
    with pytest.warns(UserWarning, match="left in float: lm_head"):
        quantized_model = quantize_model(model, bits=4, method="nf4")
    module = quantized_model.model.layers[0].mlp.down_proj
    module = QLoRALinear(module, rank=8)                       # a quantized Linear-like layer + LoRA
    from lora import add_lora_to_model, lora_state_dict
    model_with_lora = add_lora_to_model(model, rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj"])
    torch.save(lora_state_dict(model_with_lora), "lora_weights.pt")

    # --- what each line did ---
    x = torch.randn(3, 4096)
    assert isinstance(lora_layer, LoRALayer) and lora_layer.rank == 8 and lora_layer.scaling == 2
    torch.testing.assert_close(lora_layer(x), F.linear(x, original_layer.weight))   # B = 0: the base alone
    assert not lora_layer.base_layer.weight.requires_grad
    assert type(module.base_layer).__name__ == "Linear4bit" and isinstance(module, LoRALayer)
    assert quantized_model is model_with_lora is model
    state = torch.load(tmp_path / "lora_weights.pt")
    assert set(state) == {f"model.layers.{i}.self_attn.{p}.lora_{f}"
                          for i in range(2) for p in ("q_proj", "k_proj", "v_proj") for f in "AB"}
