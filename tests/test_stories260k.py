"""The real stories260K checkpoint (llama2.c format) reproduces llama2.c's greedy output.

Golden files (shared/data/stories260K, see PROVENANCE.md): greedy_t0_256steps.ids.txt holds
257 whitespace-separated ids, BOS then 256 generated tokens; greedy_t0_256steps.txt holds
their decoded text (no trailing newline).
"""
import json

import pytest
import torch

from trainers.checkpoints import hf_key_map, load_hf_model, load_llama2c
from trainers.tokenization import Llama2cTokenizer




@pytest.fixture(scope="module")
def golden(stories260k):
    ids = [int(t) for t in (stories260k / "greedy_t0_256steps.ids.txt").read_text().split()]
    text = (stories260k / "greedy_t0_256steps.txt").read_text(encoding="utf-8")
    model = load_llama2c(stories260k / "stories260K.bin").eval()
    tok = Llama2cTokenizer.from_file(stories260k / "tok512.bin")
    return model, tok, ids, text


def test_header_and_parameter_count(golden):
    model, tok, ids, _ = golden
    c = model.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len) == \
           (64, 172, 5, 8, 4, 512, 512)
    assert c.tie_word_embeddings and tok.vocab_size == 512
    assert sum(p.numel() for p in model.parameters()) == 260_032  # PROVENANCE.md
    assert len(ids) == 257 and ids[0] == tok.bos_id


def test_greedy_decoding_reproduces_llama2c(golden):
    model, tok, ids, text = golden
    out = model.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=len(ids) - 1, temperature=0)[0].tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(out, ids)) if a != b), None)
    assert first_diff is None, f"first differing token at position {first_diff}"
    assert out == ids
    assert tok.decode(out) == text


def test_one_forward_pass_agrees_with_generation(golden):
    """Teacher forcing: each position's argmax over the whole golden sequence is the next golden id."""
    model, _, ids, _ = golden
    with torch.no_grad():
        logits, loss = model(torch.tensor([ids]), torch.tensor([ids]))
    assert logits[0, :-1].argmax(-1).tolist() == ids[1:]
    assert loss.item() < 1.5  # the model is confident along its own greedy path


def test_encoding_the_golden_text_gives_the_golden_ids(golden):
    _, tok, ids, text = golden
    assert tok.encode(text) == ids
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.ref
def test_same_logits_as_transformers_llama(golden, tmp_path):
    """Written out in the HF layout (rotate-half convention), transformers' LlamaForCausalLM
    computes our logits: the llama2.c -> HF rotary permutation is right on real weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    model, _, ids, _ = golden
    c = model.config
    km = hf_key_map("llama", c)
    save_file({km.prefix + km.names[n]: p.detach().contiguous() for n, p in model.named_parameters()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size, hidden_size=c.dim,
        intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=True)))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.tensor([ids[:100]])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], hf(x).logits, atol=1e-4, rtol=1e-4)
    reloaded = load_hf_model(tmp_path).eval()
    torch.testing.assert_close(reloaded(x)[0], model(x)[0], rtol=0, atol=0)
