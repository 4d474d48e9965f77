"""A tiny random transformers LLaMA (config, seeded model, logits), shared by the tests that compare with PEFT."""
import torch


def tiny_llama_config(transformers, num_hidden_layers: int = 2, **overrides):
    """vocab 61, hidden 16, intermediate 24, 2 heads: small enough for a test, every projection present."""
    return transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24,
                                    num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=32, **overrides)


def tiny_llama(transformers):
    """The seeded (torch.manual_seed(0)) LlamaForCausalLM of tiny_llama_config, in eval mode."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(transformers)).eval()


def logits(model, idx, **kwargs):
    """The model's logits for token ids `idx`, without autograd."""
    with torch.no_grad():
        return model(input_ids=idx, **kwargs).logits
