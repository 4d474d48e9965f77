"""Checkpoint loading: HF folders (our own round trip, then parity with transformers when
installed), llama2.c files, the rotary permutation, and every bad input named clearly."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from trainers.checkpoints import (hf_key_map, load_hf_model, load_llama2c, permute_rotary, read_weights,
                                  resolve_source)
from trainers.models import MODELS, build_model




FAMILY = {"gpt2": "gpt2", "gpt2-cls": "gpt2", "distilbert-cls": "distilbert", "distilbert-qa": "distilbert",
          "llama": "llama", "llama-cls": "llama", "llama-qa": "llama"}
ARCH = {"gpt2": "GPT2LMHeadModel", "gpt2-cls": "GPT2ForSequenceClassification",
        "distilbert-cls": "DistilBertForSequenceClassification", "distilbert-qa": "DistilBertForQuestionAnswering",
        "llama": "LlamaForCausalLM", "llama-cls": "LlamaForSequenceClassification",
        "llama-qa": "LlamaForQuestionAnswering"}


def hf_config(kind, c) -> dict:
    """The config.json transformers would write for our config c."""
    family = FAMILY[kind]
    if family == "gpt2":
        d = dict(model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer,
                 n_head=c.n_head, n_embd=c.n_embd, resid_pdrop=0.0, pad_token_id=c.pad_token_id)
    elif family == "distilbert":
        d = dict(model_type="distilbert", vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
                 dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, hidden_dim=c.hidden_dim, dropout=0.0,
                 attention_dropout=0.0, seq_classif_dropout=0.0)
    else:
        d = dict(model_type="llama", vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers,
                 num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, intermediate_size=c.hidden_dim,
                 rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len,
                 tie_word_embeddings=c.tie_word_embeddings)
    return {**d, "architectures": [ARCH[kind]]}


def hf_state(model, kind) -> dict:
    """Our parameters under their HF checkpoint keys (Conv1D weights transposed back)."""
    km = hf_key_map(FAMILY[kind], model.config)
    out = {}
    for name, p in model.named_parameters():
        key = km.prefix + km.names[name] if name.startswith(km.prefix) else name  # QA LLaMA: transformer.
        out[key] = (p.t() if name in km.transpose else p).detach().contiguous().clone()
    return out


def write_folder(folder, kind, model, fmt="safetensors", state=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(kind, model.config)))
    state = hf_state(model, kind) if state is None else state
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


def tiny(kind, **overrides):
    torch.manual_seed(0)
    model = build_model(kind, MODELS[kind][0].tiny(**overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases too, so a swapped tensor shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


X = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_round_trip_through_hf_layout(tmp_path, kind, fmt):
    model = tiny(kind)
    loaded = load_hf_model(write_folder(tmp_path / kind, kind, model, fmt)).eval()
    assert type(loaded) is type(model)
    assert loaded.load_report.initialised == [] and loaded.load_report.ignored == []
    torch.testing.assert_close(loaded(X)[0], model(X)[0], rtol=0, atol=0)


def test_hub_style_gpt2_without_prefix_and_with_legacy_buffers(tmp_path):
    model = tiny("gpt2")
    state = {k.removeprefix("transformer."): v for k, v in hf_state(model, "gpt2").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    state["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    loaded = load_hf_model(write_folder(tmp_path, "gpt2", model, state=state))
    assert sorted(loaded.load_report.ignored) == ["h.0.attn.bias", "h.1.attn.masked_bias"]
    torch.testing.assert_close(loaded.eval()(X)[0], model(X)[0])


def test_base_checkpoint_into_a_task_head_initialises_only_the_head(tmp_path):
    base = tiny("distilbert-cls")
    state = {k: v for k, v in hf_state(base, "distilbert-cls").items() if k.startswith("distilbert.")}
    state["vocab_projector.weight"] = torch.zeros(3)  # an MLM head the classifier does not use
    write_folder(tmp_path, "distilbert-cls", base, state=state)
    qa = load_hf_model(tmp_path, kind="distilbert-qa")
    assert sorted(qa.load_report.initialised) == ["qa_outputs.bias", "qa_outputs.weight"]
    assert qa.load_report.ignored == ["vocab_projector.weight"]
    torch.testing.assert_close(qa.distilbert(X), base.distilbert(X))
    cls = load_hf_model(tmp_path, num_labels=4)
    assert cls.classifier.out_features == 4 and "classifier.weight" in cls.load_report.initialised


@pytest.mark.parametrize("head, initialised", [("llama-cls", ["score.weight"]),
                                               ("llama-qa", ["qa_outputs.bias", "qa_outputs.weight"])])
def test_causal_lm_checkpoint_into_a_llama_task_head(tmp_path, head, initialised):
    """A LLaMA LM checkpoint (trunk under `model.`) loads into the classification and QA heads
    (QA trunk under `transformer.`, as HF names it): trunk copied, head fresh, lm_head dropped."""
    lm = tiny("llama")
    loaded = load_hf_model(write_folder(tmp_path, "llama", lm), kind=head)
    assert sorted(loaded.load_report.initialised) == initialised
    assert loaded.load_report.ignored == ["lm_head.weight"]
    trunk = loaded.model if head == "llama-cls" else loaded.transformer
    torch.testing.assert_close(trunk(X), lm.model(X), rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing from the checkpoint: lm_head.weight"):
        load_hf_model(write_folder(tmp_path / "cls", "llama-cls", tiny("llama-cls")), kind="llama")


def test_loaded_models_come_back_in_eval_mode(tmp_path):
    """Like transformers' from_pretrained: dropout off until train() (or the caller) says otherwise."""
    source = tiny("distilbert-qa", dropout=0.1, attention_dropout=0.1)
    folder = write_folder(tmp_path / "hf", "distilbert-qa", source)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dropout": 0.1, "attention_dropout": 0.1}))
    loaded = load_hf_model(folder)
    assert loaded.config.dropout == 0.1
    assert not any(m.training for m in loaded.modules())
    torch.testing.assert_close(loaded(X)[0], loaded(X)[0], rtol=0, atol=0)  # deterministic despite dropout
    lm = load_llama2c(write_llama2c(tmp_path / "m.bin", tiny("llama", tie_word_embeddings=True)))
    assert not any(m.training for m in lm.modules())


def test_key_problems_are_named(tmp_path):
    model = tiny("llama")
    state = hf_state(model, "llama")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    state["model.layers.9.surprise"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_hf_model(write_folder(tmp_path, "llama", model, state=state))
    message = str(err.value)
    assert "missing from the checkpoint: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected in the checkpoint: layers.9.surprise" in message
    assert "layers.0.self_attn.q_proj.weight: checkpoint (3, 3) vs model" in message


def test_no_weights_corrupt_files_and_bad_names(tmp_path):
    model = tiny("gpt2")
    folder = write_folder(tmp_path / "ok", "gpt2", model)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors.*found \\['config.json'\\]"):
        load_hf_model(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_hf_model(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="pytorch_model.bin.*corrupt"):
        read_weights(folder)
    with pytest.raises(ValueError, match="unknown model 'bert'; known models: gpt2, gpt2-cls"):
        load_hf_model(write_folder(tmp_path / "good", "gpt2", model), kind="bert")
    with pytest.raises(ValueError, match="cannot load it as 'llama'"):
        load_hf_model(tmp_path / "good", kind="llama")
    (tmp_path / "good" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        load_hf_model(tmp_path / "good")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        resolve_source(str(tmp_path / "absent"))
    with pytest.raises(NotADirectoryError, match="expected a folder holding config.json and weights, got the file"):
        resolve_source(tmp_path / "good" / "config.json")


def test_hub_ids_go_through_snapshot_download(tmp_path, monkeypatch):
    """No network here: snapshot_download is replaced, once by a fake hub, once by a failure."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    model = tiny("gpt2")
    write_folder(tmp_path / "hub", "gpt2", model)
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = load_hf_model("someone/tiny-gpt2")
    assert calls[0][0] == "someone/tiny-gpt2" and "*.safetensors" in calls[0][1]
    torch.testing.assert_close(loaded.eval()(X)[0], model(X)[0])

    def offline(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="not a local folder, and fetching it .* failed.*no network"):
        load_hf_model("someone/tiny-gpt2")


def test_load_in_bfloat16(tmp_path):
    model = tiny("llama")
    loaded = load_hf_model(write_folder(tmp_path, "llama", model), dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(loaded(X)[0].float(), model(X)[0], atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------- llama2.c

def rope_interleaved(x, theta=10000.0):
    """Meta/llama2.c rotary: pairs (2i, 2i+1) as complex numbers times e^{i t f_i}. x (T, nh, hs)."""
    T, _, hs = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, hs, 2).float() / hs)
    rot = torch.polar(torch.ones(T, hs // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, hs/2)
    xc = torch.view_as_complex(x.reshape(T, -1, hs // 2, 2))
    return torch.view_as_real(xc * rot[:, None]).reshape(x.shape)


def test_permuted_weights_give_the_same_attention_scores():
    """q.k with interleaved RoPE on W equals q.k with rotate-half RoPE on permute_rotary(W)."""
    from trainers.models.llama import apply_rope, rope_cos_sin
    nh, hs, dim, T = 2, 8, 12, 6
    wq, wk, x = torch.randn(nh * hs, dim), torch.randn(nh * hs, dim), torch.randn(T, dim)
    q1 = rope_interleaved((x @ wq.T).view(T, nh, hs))
    k1 = rope_interleaved((x @ wk.T).view(T, nh, hs))
    cos, sin = rope_cos_sin(T, hs, 10000.0, "cpu")
    q2 = apply_rope((x @ permute_rotary(wq, nh).T).view(T, nh, hs).transpose(0, 1), cos, sin)  # (nh, T, hs)
    k2 = apply_rope((x @ permute_rotary(wk, nh).T).view(T, nh, hs).transpose(0, 1), cos, sin)
    torch.testing.assert_close(torch.einsum("thd,shd->hts", q1, k1), q2 @ k2.transpose(1, 2))


def unpermute_rotary(w, n_heads):
    out_features, in_features = w.shape
    return w.view(n_heads, 2, out_features // n_heads // 2, in_features).transpose(1, 2).reshape(w.shape)


def write_llama2c(path, model):
    """Our model in llama2.c's legacy layout (the inverse of load_llama2c)."""
    c = model.config
    layers = model.model.layers
    header = struct.pack("<7i", c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                         c.vocab_size if c.tie_word_embeddings else -c.vocab_size, c.max_seq_len)
    angles = torch.outer(torch.arange(c.max_seq_len).float(),
                         1.0 / 10000.0 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    arrays = [model.model.embed_tokens.weight, torch.stack([l.input_layernorm.weight for l in layers]),
              torch.stack([unpermute_rotary(l.self_attn.q_proj.weight, c.n_heads) for l in layers]),
              torch.stack([unpermute_rotary(l.self_attn.k_proj.weight, c.n_kv_heads) for l in layers]),
              torch.stack([l.self_attn.v_proj.weight for l in layers]), torch.stack([l.self_attn.o_proj.weight for l in layers]),
              torch.stack([l.post_attention_layernorm.weight for l in layers]),
              torch.stack([l.mlp.gate_proj.weight for l in layers]), torch.stack([l.mlp.down_proj.weight for l in layers]),
              torch.stack([l.mlp.up_proj.weight for l in layers]), model.model.norm.weight, angles.cos(), angles.sin()]
    if not c.tie_word_embeddings:
        arrays.append(model.lm_head.weight)
    path.write_bytes(header + b"".join(a.detach().numpy().astype("<f4").tobytes() for a in arrays))
    return path


def test_permute_and_unpermute_are_inverse():
    w = torch.randn(16, 5)
    torch.testing.assert_close(permute_rotary(unpermute_rotary(w, 2), 2), w)
    assert not torch.equal(permute_rotary(w, 2), w)


@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_round_trip(tmp_path, tied):
    model = tiny("llama", tie_word_embeddings=tied, norm_eps=1e-5)
    loaded = load_llama2c(write_llama2c(tmp_path / "m.bin", model)).eval()
    assert loaded.config.tie_word_embeddings == tied
    torch.testing.assert_close(loaded(X)[0], model(X)[0])


@pytest.mark.parametrize("head", ["llama-cls", "llama-qa"])
def test_llama2c_trunk_under_a_task_head(tmp_path, head):
    """stories260K-style files load under the task heads too (load_model does this for
    llama2.c models on classification and QA tasks)."""
    model = tiny("llama", tie_word_embeddings=True, norm_eps=1e-5)
    loaded = load_llama2c(write_llama2c(tmp_path / "m.bin", model), head, num_labels=4)
    trunk = loaded.model if head == "llama-cls" else loaded.transformer
    torch.testing.assert_close(trunk(X), model.model(X))
    assert loaded.load_report.initialised and all(n.startswith(("score.", "qa_outputs."))
                                                  for n in loaded.load_report.initialised)
    if head == "llama-cls":
        assert loaded.score.out_features == 4
    with pytest.raises(ValueError, match="kind must be 'llama', 'llama-cls' or 'llama-qa', got 'gpt2'"):
        load_llama2c(tmp_path / "m.bin", "gpt2")
    with pytest.raises(ValueError, match=r"LlamaConfig has no field\(s\) \['n_labels'\]"):
        load_llama2c(tmp_path / "m.bin", head, n_labels=4)


def test_llama2c_bad_files(tmp_path):
    good = write_llama2c(tmp_path / "m.bin", tiny("llama", tie_word_embeddings=True)).read_bytes()
    (tmp_path / "cut.bin").write_bytes(good[:-8])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_llama2c(tmp_path / "cut.bin")
    (tmp_path / "junk.bin").write_bytes(np.random.default_rng(0).integers(-9, 0, 64).astype("<i4").tobytes())
    with pytest.raises(ValueError, match="not a valid llama2.c header"):
        load_llama2c(tmp_path / "junk.bin")
    (tmp_path / "v1.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1) + good[8:])
    with pytest.raises(ValueError, match="versioned llama2.c export"):
        load_llama2c(tmp_path / "v1.bin")
    with pytest.raises(FileNotFoundError, match="absent.bin.* not found"):
        load_llama2c(tmp_path / "absent.bin")


# ----------------------------------------------------------------------------- parity with transformers

def randomize(hf_model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf_model.eval()


@pytest.mark.ref
def test_parity_gpt2_lm_and_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    hf = randomize(transformers.GPT2LMHeadModel(cfg))
    hf.save_pretrained(tmp_path / "lm")
    ours = load_hf_model(tmp_path / "lm").eval()
    mask = torch.ones_like(X)
    mask[1, 7:] = 0  # right padding
    torch.testing.assert_close(ours(X)[0], hf(X).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours(X, X)[1], hf(X, labels=X).loss, atol=1e-5, rtol=1e-4)
    ours_masked, hf_masked = ours(X, attention_mask=mask)[0], hf(X, attention_mask=mask).logits
    torch.testing.assert_close(ours_masked[0], hf_masked[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_masked[1, :7], hf_masked[1, :7], atol=1e-5, rtol=1e-4)

    hf_cls = randomize(transformers.GPT2ForSequenceClassification(cfg))
    hf_cls.save_pretrained(tmp_path / "cls")
    ours_cls = load_hf_model(tmp_path / "cls").eval()
    padded = X.masked_fill(mask == 0, 0)
    torch.testing.assert_close(ours_cls(padded)[0], hf_cls(padded).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.ref
def test_parity_distilbert_encoder_classifier_and_qa(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DistilBertConfig(vocab_size=97, max_position_embeddings=32, dim=16, n_layers=2, n_heads=2,
                                        hidden_dim=32)
    mask = torch.ones_like(X)
    mask[1, 6:] = 0
    hf_base = randomize(transformers.DistilBertModel(cfg))
    hf_base.save_pretrained(tmp_path / "base")
    ours = load_hf_model(tmp_path / "base").eval()
    assert "classifier.weight" in ours.load_report.initialised
    torch.testing.assert_close(ours.distilbert(X, mask)[0], hf_base(X, attention_mask=mask).last_hidden_state[0],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.distilbert(X, mask)[1, :6],
                               hf_base(X, attention_mask=mask).last_hidden_state[1, :6], atol=1e-5, rtol=1e-4)

    hf_cls = randomize(transformers.DistilBertForSequenceClassification(cfg))
    hf_cls.save_pretrained(tmp_path / "cls")
    ours_cls = load_hf_model(tmp_path / "cls").eval()
    labels = torch.tensor([1, 0])
    out = hf_cls(X, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours_cls(X, labels, mask)[0], out.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_cls(X, labels, mask)[1], out.loss, atol=1e-5, rtol=1e-4)

    hf_qa = randomize(transformers.DistilBertForQuestionAnswering(cfg))
    hf_qa.save_pretrained(tmp_path / "qa")
    ours_qa = load_hf_model(tmp_path / "qa").eval()
    start, end = torch.tensor([1, 2]), torch.tensor([4, 5])
    out = hf_qa(X, attention_mask=mask, start_positions=start, end_positions=end)
    logits, loss = ours_qa(X, torch.stack([start, end], dim=1), mask)
    torch.testing.assert_close(logits[..., 0], out.start_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[..., 1], out.end_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-4)


@pytest.mark.ref
@pytest.mark.parametrize("tied", [False, True])
def test_parity_llama(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-5)
    hf = randomize(transformers.LlamaForCausalLM(cfg))
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path).eval()
    assert ours.config.n_kv_heads == 2 and ours.config.tie_word_embeddings == tied
    torch.testing.assert_close(ours(X)[0], hf(X).logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours(X, X)[1], hf(X, labels=X).loss, atol=1e-5, rtol=1e-4)


def test_damaged_folders_name_the_file_and_key(tmp_path):
    model = tiny("gpt2")
    folder = write_folder(tmp_path / "m", "gpt2", model)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.safetensors' is empty \(0 bytes\)"):
        load_hf_model(folder)
    weights.unlink()
    torch.save([1, 2, 3], folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin' does not hold a state dict of tensors "
                                         r"\(it holds a list"):
        load_hf_model(folder)
    (folder / "pytorch_model.bin").unlink()
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"wte.weight": "part-1.safetensors"')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json' is not valid JSON \(line 1, column"):
        load_hf_model(folder)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"index.json': key 'weight_map' must map tensor names to shard"):
        load_hf_model(folder)
    index.write_text(json.dumps({"weight_map": {"wte.weight": "part-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"lists the shard 'part-1.safetensors', which is not in"):
        load_hf_model(folder)


def test_config_lacking_a_key_or_not_an_object_names_the_file(tmp_path):
    model = tiny("gpt2")
    folder = write_folder(tmp_path / "m", "gpt2", model)
    config = json.loads((folder / "config.json").read_text())
    del config["n_embd"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json' lacks the key 'n_embd', needed for model_type 'gpt2'"):
        load_hf_model(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json' must hold a JSON object \(the model configuration\), "
                                         r"got list"):
        load_hf_model(folder)


@pytest.mark.ref
def test_parity_llama_classifier_and_qa(tmp_path):
    """HF's LlamaForSequenceClassification (`score`, last non-pad token) and
    LlamaForQuestionAnswering (trunk `transformer`, `qa_outputs`): same logits, same losses."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, pad_token_id=0, num_labels=3)
    mask = torch.ones_like(X)
    mask[1, 6:] = 0
    padded = X.masked_fill(mask == 0, 0)  # right padding with pad id 0 (X holds no 0)

    hf_cls = randomize(transformers.LlamaForSequenceClassification(cfg))
    hf_cls.save_pretrained(tmp_path / "cls")
    ours_cls = load_hf_model(tmp_path / "cls")
    assert type(ours_cls).__name__ == "LlamaForSequenceClassification" and ours_cls.load_report.initialised == []
    assert ours_cls.config.num_labels == 3 and ours_cls.config.pad_token_id == 0
    labels = torch.tensor([2, 0])
    out = hf_cls(padded, attention_mask=mask, labels=labels)
    for logits, loss in (ours_cls(padded, labels, mask), ours_cls(padded, labels)):  # mask, or pad id alone
        torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-4)

    hf_qa = randomize(transformers.LlamaForQuestionAnswering(cfg))
    hf_qa.save_pretrained(tmp_path / "qa")
    ours_qa = load_hf_model(tmp_path / "qa")
    assert type(ours_qa).__name__ == "LlamaForQuestionAnswering" and ours_qa.load_report.initialised == []
    start, end = torch.tensor([1, 2]), torch.tensor([4, 10])  # 10 = T: outside the window, ignored by both
    out = hf_qa(padded, attention_mask=mask, start_positions=start, end_positions=end)
    logits, loss = ours_qa(padded, torch.stack([start, end], dim=1), mask)
    torch.testing.assert_close(logits[..., 0], out.start_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[..., 1], out.end_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-4)
