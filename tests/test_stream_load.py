"""Streamed quantized loading (issue 14): load_quantized_model(source) is
quantize_model(load_hf_model(source)) bit for bit, without the float model; fill_quantized
checks everything before it reads, lets each float weight go once quantized, and refuses a
bad checkpoint naming the key and the file."""
import json
import weakref

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from quantization import Linear4bit, Linear8bit, quantize_model
from quantization.stream import LazyTensor, fill_quantized, safetensors_tensors
from tests.test_checkpoints import X, hf_state, tiny, write_folder, write_llama2c
from trainers.checkpoints import load_hf_model, load_llama2c
from trainers.models import MODELS, LlamaConfig, LlamaForCausalLM
from trainers.quantized_load import load_quantized_model

pytestmark = pytest.mark.filterwarnings("ignore:(quantize_model|fill_quantized). left in float")


def assert_same(got: nn.Module, ref: nn.Module) -> None:
    """Every parameter and buffer equal in dtype, shape and bits, the same module types, the same
    requires_grad flags and ties, and the same logits."""
    a, b = got.state_dict(keep_vars=True), ref.state_dict(keep_vars=True)
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key
        assert a[key].requires_grad == b[key].requires_grad, key
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]
    assert len(list(got.parameters())) == len(list(ref.parameters()))          # ties kept
    assert not got.training
    assert torch.equal(got(X)[0], ref(X)[0])


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("options", [dict(bits=4), dict(bits=8, include_head=True),
                                     dict(bits=4, double_quant=False, blocksize=128, skip=[r".*\.0\..*"])])
def test_streamed_load_equals_quantize_after_load(tmp_path, kind, options):
    folder = write_folder(tmp_path / kind, kind, tiny(kind))
    assert_same(load_quantized_model(folder, **options), quantize_model(load_hf_model(folder), **options))


def test_mixed_bits_dtype_and_method(tmp_path):
    folder = write_folder(tmp_path / "m", "llama", tiny("llama"))
    mixed = {"q_proj": 8, "down_proj": 4}
    assert_same(load_quantized_model(folder, mixed), quantize_model(load_hf_model(folder), mixed))
    got = load_quantized_model(folder, method="int8", dtype=torch.bfloat16, compute_dtype=torch.float32)
    ref = quantize_model(load_hf_model(folder, dtype=torch.bfloat16), method="int8", compute_dtype=torch.float32)
    assert_same(got, ref)
    assert isinstance(got.model.layers[0].self_attn.q_proj, Linear8bit)
    assert got.model.layers[0].self_attn.q_proj.weight_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bits=4 and method='int8' disagree"):
        load_quantized_model(folder, 4, method="int8")


def write_sharded(folder, kind, model, shards=3):
    """The model as an HF sharded checkpoint: `shards` safetensors files and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    write_folder(folder, kind, model)
    (folder / "model.safetensors").unlink()
    state = hf_state(model, kind)
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sharded_checkpoint_and_tied_weights(tmp_path, kind):
    """GPT-2's lm_head is tied to wte, as is a tied LLaMA's to embed_tokens: still one tensor, in float."""
    overrides = {"tie_word_embeddings": True} if kind == "llama" else {}
    folder = write_sharded(tmp_path / "s", kind, tiny(kind, **overrides))
    got = load_quantized_model(folder)
    assert_same(got, quantize_model(load_hf_model(folder)))
    embed = got.transformer.wte if kind == "gpt2" else got.model.embed_tokens
    assert got.lm_head.weight is embed.weight and type(got.lm_head) is nn.Linear


@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_file(tmp_path, tied):
    path = write_llama2c(tmp_path / "m.bin", tiny("llama", tie_word_embeddings=tied, norm_eps=1e-5))
    assert_same(load_quantized_model(path, include_head=True), quantize_model(load_llama2c(path), include_head=True))


def test_stories260k_streamed(stories260k):
    path = stories260k / "stories260K.bin"
    assert_same(load_quantized_model(path), quantize_model(load_llama2c(path)))


@pytest.mark.parametrize("head", ["llama-cls", "llama-qa"])
def test_base_checkpoint_under_a_fresh_head(tmp_path, head):
    """The trunk is the float load's, bit for bit; the fresh head is initialised as the models
    initialise heads (N(0, 0.02), zero bias) and left in float."""
    folder = write_folder(tmp_path / "b", "llama", tiny("llama"))
    got = load_quantized_model(folder, kind=head, num_labels=3)
    ref = quantize_model(load_hf_model(folder, kind=head, num_labels=3))
    trunk = "model" if head == "llama-cls" else "transformer"
    assert_same(getattr(got, trunk), getattr(ref, trunk))
    fresh = got.score if head == "llama-cls" else got.qa_outputs
    assert type(fresh) is nn.Linear and not fresh.weight.is_meta
    assert 0.01 < float(fresh.weight.detach().std()) < 0.04
    assert fresh.bias is None or not fresh.bias.any()
    assert got.load_report.initialised == ref.load_report.initialised
    assert got.load_report.loaded == ref.load_report.loaded


def test_float_weights_are_let_go_one_at_a_time(tmp_path, monkeypatch):
    """When a tensor is read, no float weight read for an earlier quantized layer is still
    alive: only the quantized model and the tensor at hand are held (the memory claim)."""
    import trainers.quantized_load as QL
    folder = write_folder(tmp_path / "g", "gpt2", tiny("gpt2"))    # biases and transposed weights too
    read, live_at_read = [], []

    def spying_fill(model, tensors, *args, **kwargs):
        def spy(name, entry):
            def read_and_note():
                live_at_read.append({n for n, ref in read if ref() is not None})
                value = entry.read()
                read.append((name, weakref.ref(value)))
                return value
            return LazyTensor(entry.shape, read_and_note, entry.where)
        return fill_quantized(model, {n: spy(n, e) for n, e in tensors.items()}, *args, **kwargs)
    monkeypatch.setattr(QL, "fill_quantized", spying_fill)
    model = QL.load_quantized_model(folder)
    quantized = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Linear4bit) for p in ("weight", "bias")}
    assert len(quantized) == 2 * 2 * 4 and len(read) == len(live_at_read) == len(list(load_hf_model(folder).parameters()))
    assert all(not (live & quantized) for live in live_at_read)


def test_key_and_shape_problems_name_the_key_and_file(tmp_path):
    model = tiny("llama")
    folder = write_sharded(tmp_path / "s", "llama", model)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    state = {k: v for k, v in hf_state(model, "llama").items() if index["weight_map"][k] == shard}
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:-1]
    del state["model.norm.weight" if "model.norm.weight" in state else next(iter(state))]
    missing = next(k for k, v in index["weight_map"].items() if v == shard and k not in state)
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / shard))
    with pytest.raises(ValueError) as error:
        load_quantized_model(folder)
    message = str(error.value)
    assert f"checkpoint {str(folder)!r} does not fit LlamaForCausalLM" in message
    assert f"missing from the checkpoint: {missing}" in message
    assert f"'model.layers.1.mlp.up_proj.weight' in {str(folder / shard)!r}: checkpoint (63, 32)" in message
    assert f"unexpected in the checkpoint: 'model.extra.weight' in {str(folder / shard)!r}" in message


def test_damaged_files_are_named(tmp_path):
    folder = write_folder(tmp_path / "d", "llama", tiny("llama"))
    file = folder / "model.safetensors"
    good = file.read_bytes()
    file.write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"'model.norm.weight' in '.*model.safetensors': bytes \d+..\d+ do not hold"):
        load_quantized_model(folder)
    file.write_bytes(good[:8] + b"{not json" + good[17:])
    with pytest.raises(ValueError, match="model.safetensors.: its header is not valid JSON"):
        load_quantized_model(folder)
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="model.safetensors' is 0 bytes, too short"):
        load_quantized_model(folder)
    torch.save(hf_state(tiny("llama"), "llama"), folder / "pytorch_model.bin")
    file.unlink()
    with pytest.raises(ValueError, match="pytorch_model.bin' is a pickled PyTorch file.*needs safetensors"):
        load_quantized_model(folder)


def test_bad_values_fail_before_the_model_is_returned(tmp_path):
    """A NaN in the last layer read: the error names the layer and where its weight is."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    folder = write_folder(tmp_path / "n", "llama", model)
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.down_proj' \('model.layers.1.mlp.down_proj"
                                         r".weight' in '.*model.safetensors'\): .*NaN"):
        load_quantized_model(folder)


def _skeleton():
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig.tiny())


def _tensors(model):
    return {n: LazyTensor(tuple(p.shape), (lambda p=p: p.detach().clone()), f"{n!r} in memory")
            for n, p in model.named_parameters()}


def test_fill_quantized_is_all_or_nothing():
    """A read that fails late (the last tensor) leaves the skeleton exactly as it was: every
    parameter the same meta object, every module the same."""
    skeleton, source = _skeleton(), tiny("llama")
    before = [(n, id(m)) for n, m in skeleton.named_modules()]
    params = {n: p for n, p in skeleton.named_parameters()}
    tensors = _tensors(source)
    last = list(tensors)[-1]

    def broken():
        raise OSError("disk went away")
    tensors[last] = LazyTensor(tensors[last].shape, broken, "'x' in 'file.safetensors'")
    with pytest.raises(ValueError, match=r"cannot read 'x' in 'file.safetensors' \(for lm_head.weight\): "
                                         "OSError: disk went away"):
        fill_quantized(skeleton, tensors)
    assert [(n, id(m)) for n, m in skeleton.named_modules()] == before
    assert all(p is params[n] and p.is_meta for n, p in skeleton.named_parameters())


def test_fill_quantized_checks_names_shapes_and_buffers_first():
    skeleton, source = _skeleton(), tiny("llama")
    tensors = _tensors(source)
    tensors["model.norm.weight"] = LazyTensor((5,), tensors["model.norm.weight"].read, "'norm' in 'f'")
    tensors["nope.weight"] = tensors.pop("model.layers.0.mlp.up_proj.weight")
    skeleton.model.register_buffer("table", torch.empty(3, device="meta"))
    with pytest.raises(ValueError) as error:
        fill_quantized(skeleton, tensors)
    message = str(error.value)
    for part in ["missing from the checkpoint: model.layers.0.mlp.up_proj.weight",
                 "no such parameter in LlamaForCausalLM: nope.weight",
                 "wrong shape: 'norm' in 'f': checkpoint (5,) vs model model.norm.weight (32,)",
                 "buffers on the meta device (a skeleton's buffers must hold values): model.table"]:
        assert part in message


def test_a_header_that_lies_about_the_shape_is_caught():
    skeleton, tensors = _skeleton(), _tensors(tiny("llama"))
    entry = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = LazyTensor(entry.shape, lambda: torch.zeros(4), "'norm' in 'f'")
    with pytest.raises(ValueError, match=r"'norm' in 'f' read as shape \(4,\), its header says \(32,\)"):
        fill_quantized(skeleton, tensors)


def test_safetensors_reader(tmp_path):
    """The plain-read safetensors reader gives what safetensors' own loader gives, every dtype;
    a key in two files is refused naming both."""
    from safetensors.torch import load_file
    state = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
             "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.zeros(0, 3), "f": torch.tensor([True, False])}
    save_file(state, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    tensors = safetensors_tensors([tmp_path / "x.safetensors"])
    reference = load_file(str(tmp_path / "x.safetensors"))
    assert set(tensors) == set(reference)
    for key, entry in tensors.items():
        value = entry.read()
        assert value.dtype == reference[key].dtype and entry.shape == tuple(reference[key].shape)
        assert torch.equal(value, reference[key])
    save_file({"a": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ValueError, match=r"key 'a' is in two files: 'a' in '.*x.safetensors' and '.*y.safetensors'"):
        safetensors_tensors([tmp_path / "x.safetensors", tmp_path / "y.safetensors"])


@pytest.mark.slow
def test_peak_memory_of_a_350m_parameter_checkpoint():
    """The issue's measurement: a 349M-parameter LLaMA checkpoint (1.4 GB in float32, sharded),
    each load in a fresh process; the streamed load's peak RSS rises by <= 0.35x the checkpoint
    (NF4 trunk, float embeddings and lm_head), loading then quantizing by ~2x."""
    from trainers.bench.load import FULL, load_memory
    m = load_memory(FULL)
    streamed, after = m.ratio(m.streamed), m.ratio(m.after_load)
    print(f"streamed {streamed:.3f}x, load-then-quantize {after:.3f}x of {m.checkpoint_bytes / 2**20:.0f} MiB")
    assert streamed <= 0.35 and after > 1.5


def test_the_benchmark_checkpoint_writer(tmp_path):
    """trainers.bench.load writes an HF sharded LLaMA checkpoint both loaders read alike."""
    from trainers.bench.load import write_synthetic_llama
    size = write_synthetic_llama(tmp_path / "c", LlamaConfig.tiny(), shard_bytes=20_000)
    shards = set(json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 3 and size == sum((tmp_path / "c" / s).stat().st_size for s in shards)
    assert_same(load_quantized_model(tmp_path / "c"), quantize_model(load_hf_model(tmp_path / "c")))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu runs these)")
def test_streamed_load_onto_the_gpu(tmp_path):
    """device="cuda": each weight is quantized on the GPU, as quantize_model on a model moved there."""
    folder = write_folder(tmp_path / "c", "llama", tiny("llama"))
    got = load_quantized_model(folder, device="cuda")
    ref = quantize_model(load_hf_model(folder).to("cuda"))
    a, b = got.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(a[k].is_cuda and torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(got(X.cuda())[0], ref(X.cuda())[0])
