"""A tiny random transformers LLaMA config, shared by the tests that compare with PEFT."""


def tiny_llama_config(transformers, num_hidden_layers: int = 2, **overrides):
    """vocab 61, hidden 16, intermediate 24, 2 heads: small enough for a test, every projection present."""
    return transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24,
                                    num_hidden_layers=num_hidden_layers, num_attention_heads=2,
                                    num_key_value_heads=2, max_position_embeddings=32, **overrides)
