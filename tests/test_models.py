"""The from-scratch models on tiny seeded configs: shapes, losses computed two ways,
causality, padding masks, GQA, RoPE, gradient checkpointing, generation, build_model."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.models import MODELS, DistilBertConfig, GPT2Config, LlamaConfig, build_model
from trainers.models.llama import apply_rope, rope_cos_sin




CAUSAL = ["gpt2", "llama"]


def tiny(kind, **overrides):
    torch.manual_seed(0)
    return build_model(kind, MODELS[kind][0].tiny(**overrides)).eval()


def ids(B=2, T=12, vocab=90, seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_build_model_unknown_name_lists_known():
    with pytest.raises(ValueError) as err:
        build_model("gpt3")
    for name in MODELS:
        assert name in str(err.value)


def test_build_model_from_config_picks_family_and_overrides():
    assert type(build_model(LlamaConfig.tiny())).__name__ == "LlamaForCausalLM"
    assert type(build_model(GPT2Config.tiny())).__name__ == "GPT2LMHeadModel"
    model = build_model("distilbert-cls", DistilBertConfig.tiny(), num_labels=5)
    assert model.classifier.out_features == 5
    with pytest.raises(TypeError, match=r"build_model\('gpt2'\): expected a GPT2Config, got LlamaConfig"):
        build_model("gpt2", LlamaConfig.tiny())


@pytest.mark.parametrize("kind, names", [
    ("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc",
              "transformer.h.1.mlp.c_proj", "lm_head"]),
    ("gpt2-cls", ["transformer.h.0.attn.c_attn", "score"]),
    ("distilbert-cls", ["distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.0.attention.k_lin",
                        "distilbert.transformer.layer.0.attention.v_lin", "distilbert.transformer.layer.1.attention.out_lin",
                        "distilbert.transformer.layer.1.ffn.lin1", "distilbert.transformer.layer.1.ffn.lin2",
                        "pre_classifier", "classifier"]),
    ("distilbert-qa", ["distilbert.transformer.layer.0.attention.q_lin", "qa_outputs"]),
    ("llama", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
               "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
               "model.layers.1.mlp.down_proj", "lm_head"]),
    ("llama-cls", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "score"]),
    ("llama-qa", ["transformer.layers.0.self_attn.q_proj", "transformer.layers.1.mlp.down_proj", "qa_outputs"]),
])
def test_adapter_targets_are_linear_with_hf_names(kind, names):
    modules = dict(tiny(kind).named_modules())
    for name in names:
        assert isinstance(modules[name], nn.Linear), name


def test_gpt2_lm_head_is_tied_and_llama_tie_is_optional():
    gpt = tiny("gpt2")
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    assert tiny("llama").lm_head.weight is not tiny("llama").model.embed_tokens.weight
    tied = tiny("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize("kind", CAUSAL)
def test_lm_loss_is_shifted_cross_entropy_with_ignore(kind):
    model, x = tiny(kind), ids()
    labels = x.clone()
    labels[0, 5:] = -100
    logits, loss = model(x, labels)
    assert logits.shape == (2, 12, model.config.vocab_size)
    manual = [F.cross_entropy(logits[b, t], x[b, t + 1]) for b in range(2) for t in range(11)
              if labels[b, t + 1] != -100]
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    assert model(x)[1] is None


@pytest.mark.parametrize("kind", CAUSAL)
def test_causal_models_do_not_look_ahead(kind):
    model, x = tiny(kind), ids()
    changed = x.clone()
    changed[:, 7:] = 5
    torch.testing.assert_close(model(x)[0][:, :7], model(changed)[0][:, :7])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2-cls", "distilbert-cls", "distilbert-qa", "llama-cls",
                                  "llama-qa"])
@settings(max_examples=4, deadline=None)
@given(lengths=st.lists(st.integers(2, 10), min_size=1, max_size=3))
def test_padding_does_not_change_real_positions(kind, lengths):
    """A right-padded batch with its mask gives each sequence the output it gets alone."""
    model, T = tiny(kind), max(lengths)
    seqs = [ids(1, n, seed=n)[0] for n in lengths]
    batch = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        batch[b, :len(s)], mask[b, :len(s)] = s, 1
    out = model(batch, attention_mask=mask)[0]
    for b, s in enumerate(seqs):
        alone = model(s[None])[0][0]
        got = out[b] if kind.endswith("cls") else out[b, :len(s)]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)


def test_distilbert_mask_hides_padding_anywhere():
    """Bidirectional attention: masked tokens are invisible to the real ones, whatever they hold."""
    model = tiny("distilbert-cls")
    x = ids(1, 10)
    junk = x.clone()
    junk[0, 6:] = 7
    mask = torch.tensor([[1] * 6 + [0] * 4])
    torch.testing.assert_close(model(x, attention_mask=mask)[0], model(junk, attention_mask=mask)[0])
    assert not torch.allclose(model(x)[0], model(junk)[0])


@pytest.mark.parametrize("kind", ["gpt2-cls", "llama-cls"])
def test_causal_classifier_reads_last_real_token_from_pad_id(kind):
    model = tiny(kind, pad_token_id=0)
    x = ids(1, 6)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded)[0], model(x)[0], atol=1e-5, rtol=1e-4)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)  # left padding: the last token is real
    mask = (left != 0).long()
    if kind == "llama-cls":  # RoPE scores depend on offsets only, so left padding changes nothing
        torch.testing.assert_close(model(left, attention_mask=mask)[0], model(x)[0], atol=1e-5, rtol=1e-4)


def test_llama_classifier_is_score_at_the_last_real_token():
    """Two ways: the head's logits, and `score` applied to the trunk's hidden state by hand."""
    model, x = tiny("llama-cls", num_labels=4), ids(3, 9)
    mask = torch.ones_like(x)
    mask[0, 5:], mask[2, 2:] = 0, 0
    y = torch.tensor([3, 0, -100])
    logits, loss = model(x, y, mask)
    h = model.model(x, mask)  # (B, T, C)
    expected = torch.stack([model.score(h[0, 4]), model.score(h[1, 8]), model.score(h[2, 1])])
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:2], y[:2]))
    assert model.score.bias is None and model(x)[1] is None


@pytest.mark.parametrize("family", ["distilbert", "llama"])
def test_classifier_and_qa_losses(family):
    cls = tiny(f"{family}-cls")
    x, y = ids(3, 8), torch.tensor([0, 1, 1])
    logits, loss = cls(x, y)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    qa = tiny(f"{family}-qa")
    logits, loss = qa(x, torch.tensor([[1, 3], [0, 7], [2, 100]]))  # 100: outside the window, ignored
    assert logits.shape == (3, 8, 2)
    start = F.cross_entropy(logits[:, :, 0], torch.tensor([1, 0, 2]))
    end = F.cross_entropy(logits[:2, :, 1], torch.tensor([3, 7]))
    torch.testing.assert_close(loss, (start + end) / 2)


def test_gqa_equals_multi_head_attention_with_repeated_kv():
    """Two ways: a GQA model, and an MHA model whose k/v heads are the GQA ones repeated."""
    gqa = tiny("llama", n_heads=4, n_kv_heads=2)
    mha = tiny("llama", n_heads=4, n_kv_heads=4)
    state = gqa.state_dict()
    hs = gqa.config.head_dim
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(2, hs, -1).repeat_interleave(2, dim=0).reshape(4 * hs, -1)
    mha.load_state_dict(state)
    x = ids()
    torch.testing.assert_close(gqa(x)[0], mha(x)[0])


def test_rope_keeps_norms_and_scores_depend_on_offset_only():
    hs, T = 8, 20
    cos, sin = rope_cos_sin(T, hs, 10000.0, "cpu")
    q, k = torch.randn(hs), torch.randn(hs)
    rq = apply_rope(q.expand(T, hs), cos, sin)  # (T, hs): q placed at every position
    rk = apply_rope(k.expand(T, hs), cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(T))
    scores = rq @ rk.T  # (T, T)
    for offset in (0, 3, 7):
        diag = torch.diagonal(scores, offset)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradient_checkpointing_gives_same_loss_and_grads(kind):
    x = ids(2, 8)
    y = {"cls": torch.tensor([0, 1]), "qa": torch.tensor([[1, 2], [3, 4]])}.get(kind.split("-")[-1], x)
    grads = []
    for flag in (False, True):
        model = tiny(kind, gradient_checkpointing=flag).train()
        _, loss = model(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", CAUSAL)
def test_generate_greedy_topk_and_sampling(kind):
    model, prompt = tiny(kind), ids(2, 3)
    greedy = model.generate(prompt, 6, temperature=0)
    assert greedy.shape == (2, 9) and torch.equal(greedy[:, :3], prompt)
    # greedy = argmax of a fresh forward pass at every step
    for t in range(3, 9):
        assert torch.equal(greedy[:, t], model(greedy[:, :t])[0][:, -1].argmax(-1))
    torch.manual_seed(1)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=1), greedy)
    torch.manual_seed(1)
    a = model.generate(prompt, 6, temperature=1.0)
    torch.manual_seed(1)
    assert torch.equal(a, model.generate(prompt, 6, temperature=1.0))
    assert a.max() < model.config.vocab_size


@pytest.mark.parametrize("kind, length", [("gpt2", "block_size"), ("llama", "max_seq_len")])
def test_generation_slides_its_window_past_the_context_length(kind, length):
    """Past the context length each token is the argmax over the last `length` tokens."""
    model = tiny(kind, **{length: 8})
    out = model.generate(ids(1, 6), 5, temperature=0)
    assert out.shape == (1, 11)
    for t in range(6, 11):
        assert torch.equal(out[:, t], model(out[:, max(0, t - 8):t])[0][:, -1].argmax(-1))
    with pytest.raises(ValueError, match=length):
        model(ids(1, 9))


def test_kv_cache_steps_equal_one_full_pass():
    """Feeding a sequence in chunks through a KVCache gives the logits of one full pass."""
    from trainers.models.common import KVCache
    for kind in CAUSAL:
        model, x = tiny(kind), ids(2, 10)
        cache = KVCache()
        chunks = [model(x[:, a:b], cache=cache)[0] for a, b in [(0, 4), (4, 5), (5, 10)]]
        torch.testing.assert_close(torch.cat(chunks, dim=1), model(x)[0], atol=1e-5, rtol=1e-4)
        assert cache.length == 10
        with pytest.raises(ValueError, match="KV cache"):
            model(x[:, :1], attention_mask=torch.ones(2, 1), cache=cache)


def test_training_lowers_loss_on_a_repeated_batch():
    model = tiny("llama").train()
    x = ids(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        _, loss = model(x, x)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0 and first == pytest.approx(math.log(97), abs=0.5)


def test_llama_left_padding_matches_unpadded():
    """RoPE is relative, so left padding (masked) leaves the real tokens' logits unchanged,
    and the padded queries that see no real key produce no NaN."""
    model, x = tiny("llama"), ids(1, 7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    out = model(padded, attention_mask=mask)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], model(x)[0], atol=1e-5, rtol=1e-4)


def test_default_configs_have_the_published_sizes():
    """GPT-2 small 124M, DistilBERT-base 66M (encoder), TinyLlama 1.1B: counted on the meta
    device, which allocates nothing."""
    with torch.device("meta"):
        gpt2, bert, llama = build_model("gpt2"), build_model("distilbert-cls"), build_model("llama")
    assert sum(p.numel() for p in gpt2.parameters()) == 124_439_808
    assert sum(p.numel() for p in bert.distilbert.parameters()) == 66_362_880
    assert sum(p.numel() for p in llama.parameters()) == 1_100_048_384
