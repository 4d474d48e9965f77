"""Named configurations, prepare(), one run's folder, the summary files (tiny models, synthetic tasks)."""
import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

from allocation import SparsityAllocator
from allocation.allocator import NullAllocator
from lora.model import adapter_layers
from quantization.layers import Linear4bit, Linear8bit
from trainers.data import TaskData, get_task
from trainers.experiments import (CONFIGS, ExperimentConfig, get_config, make_evaluator,
                                  prepare, run_experiment)
from trainers.models import GPT2Config, build_model
from trainers.results import MISSING, SUMMARY_COLUMNS, write_summary
from trainers.train import TrainConfig, train

ALL_BLOCK_LINEARS = ("c_attn", "c_proj", "c_fc")   # 'c_proj' matches attn.c_proj and mlp.c_proj


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt2", GPT2Config.tiny(n_embd=32, n_layer=3))


def tiny_cls(seed=0):
    torch.manual_seed(seed)
    return build_model("gpt2-cls", GPT2Config.tiny(n_embd=32, n_layer=2, num_labels=2))


def synthetic_task(kind="lm", n=48, T=12, seed=0):
    """A TaskData of random token sequences (classification label: is token 3 in the sequence)."""
    g = torch.Generator().manual_seed(seed)
    spec = get_task("sst2" if kind == "classification" else "tiny_shakespeare")

    def split(m):
        seqs = [torch.randint(4, 97, (T,), generator=g).tolist() for _ in range(m)]
        if kind == "classification":
            for s in seqs[::2]:
                s[int(torch.randint(0, T, (1,), generator=g))] = 3
            return {"input_ids": seqs, "labels": [int(3 in s) for s in seqs]}
        return {"input_ids": seqs, "labels": seqs}
    return TaskData(spec=spec, train=split(n), eval=split(n // 2), pad_id=0, max_length=T, block_size=T,
                    source="synthetic", eval_from="synthetic")


def calibration(task, batch_size=8):
    return lambda: task.batches("train", batch_size, shuffle=True, seed=1)


def test_every_named_config_is_there_and_described():
    assert list(CONFIGS) == ["B-FP", "B-Q4", "B-Ada", "Joint-1", "Joint-2", "Joint-3", "SADRA", "DRaFT-Q",
                             "Sparse-LoRA", "HiRA", "DoRA", "IA3", "Full-FT"]
    assert all(c.description for c in CONFIGS.values())
    c = CONFIGS
    assert (c["B-FP"].method, c["B-FP"].r, c["B-FP"].quant, c["B-FP"].allocation) == ("lora", 8, None, "uniform")
    assert c["B-Q4"].quant == 4 and c["Joint-1"].quant == 4 and c["DRaFT-Q"].quant == 4
    assert c["Joint-2"].quant == "mixed" and c["Joint-3"].quant == "mixed" and c["Joint-3"].allocation == "manual"
    assert (c["B-Ada"].r, c["B-Ada"].target_r, c["B-Ada"].method) == (12, None, "adalora")   # None: the budget
    assert (c["DRaFT-Q"].allocation, c["DRaFT-Q"].r) == ("curvature", 8)
    assert c["SADRA"].allocation == "hutchinson"
    assert [c[n].method for n in ("Sparse-LoRA", "HiRA", "DoRA", "Full-FT")] == ["sparse", "hira", "dora", "full"]


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="method must be one of"):
        ExperimentConfig("x", method="lorax")
    with pytest.raises(ValueError, match="full fine-tuning"):
        ExperimentConfig("x", method="full", quant=4)
    with pytest.raises(ValueError, match="quant must be one of"):
        ExperimentConfig("x", quant=3)
    with pytest.raises(ValueError, match="rank_pattern is used only with allocation='manual'"):
        ExperimentConfig("x", rank_pattern={"c_attn": 4})
    with pytest.raises(KeyError, match="known configs: B-FP"):
        get_config("B-F")


def test_prepare_lora_targets_the_attention_and_freezes_the_rest():
    model, alloc = prepare(tiny_lm(), CONFIGS["B-FP"])
    names = [n for n, _ in adapter_layers(model)]
    assert names == [f"transformer.h.{i}.attn.c_attn" for i in range(3)]
    assert all(layer.rank == 8 for _, layer in adapter_layers(model))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert isinstance(alloc, NullAllocator)


def test_prepare_qlora_quantizes_the_blocks_not_the_head():
    model, _ = prepare(tiny_lm(), CONFIGS["B-Q4"])
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 3 * 4                      # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert isinstance(model.lm_head, nn.Linear)         # tied to the embedding: stays float
    x = torch.randint(0, 97, (2, 8))
    _, loss = model(x, targets=x)
    loss.backward()                                     # gradients reach the adapters through NF4 bases
    assert all(layer.lora_A.grad is not None for _, layer in adapter_layers(model))


def test_prepare_classification_trains_the_head_too():
    model, _ = prepare(tiny_cls(), CONFIGS["B-FP"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("score") for n in trainable)


def test_prepare_ia3_rescales_keys_values_and_the_mlp_input():
    model, alloc = prepare(tiny_lm(), CONFIGS["IA3"])
    kinds = {n: m.feedforward for n, m in adapter_layers(model)}
    assert kinds == {**{f"transformer.h.{i}.attn.c_attn": False for i in range(3)},
                     **{f"transformer.h.{i}.mlp.c_proj": True for i in range(3)}}
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"ia3_l"}
    assert isinstance(alloc, NullAllocator)


def test_prepare_full_fine_tuning_trains_everything():
    model, alloc = prepare(tiny_lm(), CONFIGS["Full-FT"])
    assert all(p.requires_grad for p in model.parameters()) and not adapter_layers(model)
    assert isinstance(alloc, NullAllocator)


def test_sadra_ranks_follow_sensitivity_at_the_uniform_budget():
    task = synthetic_task()
    exp = dataclasses.replace(CONFIGS["SADRA"], target_modules=ALL_BLOCK_LINEARS)
    model, _ = prepare(tiny_lm(), exp, calibration(task), n_calibration=2, max_probes=6)
    layers = adapter_layers(model)
    cost = {n: l.in_features + l.out_features for n, l in layers}
    spent = sum(l.rank * cost[n] for n, l in layers)
    assert spent <= 8 * sum(cost.values())                       # never above the uniform r=8 budget
    assert spent > 8 * sum(cost.values()) - max(cost.values())   # and no further rank step would fit
    assert len({l.rank for _, l in layers}) > 1                  # not uniform


def test_joint3_depth_ramp_and_mixed_bases():
    task = synthetic_task()
    exp = dataclasses.replace(CONFIGS["Joint-3"], target_modules=("c_attn",))
    model, _ = prepare(tiny_lm(), exp, calibration(task), n_calibration=2, max_probes=4)
    ranks = [l.rank for _, l in adapter_layers(model)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    kinds = {type(m) for m in model.modules()}
    assert Linear4bit in kinds and Linear8bit in kinds


def test_hutchinson_configs_need_calibration():
    with pytest.raises(ValueError, match="calibration"):
        prepare(tiny_lm(), CONFIGS["SADRA"], None)


def test_adaptive_configs_get_their_allocators():
    task = synthetic_task()
    _, ada = prepare(tiny_lm(), CONFIGS["B-Ada"], steps=50)
    _, draft = prepare(tiny_lm(), CONFIGS["DRaFT-Q"], steps=50)
    _, sparse = prepare(tiny_lm(), CONFIGS["Sparse-LoRA"], calibration(task), steps=50)
    assert type(ada).__name__ == "AdaLoRAAllocator"
    assert type(draft).__name__ == "CurvatureRankAllocator"
    assert isinstance(sparse, SparsityAllocator)


def test_unknown_family_needs_explicit_targets():
    with pytest.raises(ValueError, match="give target_modules"):
        prepare(nn.Sequential(nn.Linear(4, 4)), CONFIGS["B-FP"])


def run(tmp_path, name, config="B-FP", kind="lm", steps=12, **kw):
    task = synthetic_task(kind)
    model = tiny_lm() if kind == "lm" else tiny_cls()
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=6, progress=False,
                      device="cpu")
    return run_experiment(get_config(config) if isinstance(config, str) else config, model, task, cfg,
                          tmp_path / name, make_evaluator(task), model_name="gpt2-tiny", **kw)


def test_run_experiment_writes_the_run_folder(tmp_path):
    row = run(tmp_path, "a", "B-FP", kind="classification")
    folder = tmp_path / "a"
    for name in ("config.json", "metrics.json", "loss_log.csv", "eval_log.json", "rank_history.json",
                 "adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).exists(), name
    assert not (folder / "checkpoint.pt").exists()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and 0 <= metrics["metric_value"] <= 1
    assert row["metric_value"] == metrics["metric_value"] and row["config"] == "B-FP"
    with open(folder / "loss_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(12))
    config = json.loads((folder / "config.json").read_text())
    assert config["experiment"]["name"] == "B-FP" and config["train"]["steps"] == 12


def test_run_experiment_never_overwrites_silently(tmp_path):
    run(tmp_path, "a", "B-FP", steps=2)
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(tmp_path, "a", "B-FP", steps=2)
    run(tmp_path, "a", "Full-FT", steps=2, overwrite=True)
    assert (tmp_path / "a" / "model.safetensors").exists()
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()   # the old run's files are gone
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"           # files that are not a run's stay


def test_summary_has_one_full_row_per_run(tmp_path):
    for config in ("B-FP", "Full-FT", "Sparse-LoRA"):
        run(tmp_path, config, config, steps=4)
    csv_path, json_path = write_summary(tmp_path)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == sorted(["B-FP", "Full-FT", "Sparse-LoRA"])
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    for r in rows:
        assert all(v not in ("", MISSING) for v in r.values()), r
        assert r["metric"] == "perplexity" and math.isfinite(float(r["metric_value"]))
    full = next(r for r in rows if r["config"] == "Full-FT")
    assert float(full["trainable_pct"]) == pytest.approx(100.0)
    assert set(json.loads(json_path.read_text())) == {"B-FP", "Full-FT", "Sparse-LoRA"}


def test_sparse_lora_reaches_its_sparsity(tmp_path):
    run(tmp_path, "s", "Sparse-LoRA", steps=20)
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "s" / "adapter_model.safetensors")
    factors = [t for k, t in tensors.items() if k.endswith(("lora_A.weight", "lora_B.weight"))]
    assert factors
    for t in factors:
        assert (t == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_evaluator_matches_a_direct_computation():
    task = synthetic_task("lm")
    model = tiny_lm().eval()
    got = make_evaluator(task, batch_size=5)(model)
    with torch.no_grad():
        x = torch.tensor(task.eval["input_ids"])
        _, loss = model(x, targets=x)          # equal lengths: the mean over all predicted tokens
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)

    task = synthetic_task("classification")
    model = tiny_cls().eval()
    got = make_evaluator(task, batch_size=7)(model)
    with torch.no_grad():
        preds = model(torch.tensor(task.eval["input_ids"]))[0].argmax(-1)
    assert got["accuracy"] == pytest.approx((preds == torch.tensor(task.eval["labels"])).float().mean().item())


class Crash(Exception):
    pass


@pytest.mark.parametrize("config", ["DRaFT-Q", "B-Ada"])
def test_resume_with_a_real_adaptive_allocator_is_exact(tmp_path, config):
    """DRaFT-Q resizes layers and AdaLoRA masks them during the run: the checkpoint's ranks
    are restored before its parameters, and the resumed run reaches the same losses."""
    task = synthetic_task()
    cfg = TrainConfig(steps=18, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, checkpoint_every=6,
                      progress=False, device="cpu")

    def batches(epoch):
        return task.batches("train", 8, shuffle=True, seed=epoch, drop_last=True)

    def crashing(epoch, count=[0]):
        for batch in batches(epoch):
            if count[0] == 14:
                raise Crash()
            count[0] += 1
            yield batch

    def fresh():
        torch.manual_seed(0)
        return prepare(tiny_lm(), get_config(config), steps=cfg.steps)

    model, alloc = fresh()
    full = train(model, batches, cfg, allocator=alloc, out_dir=tmp_path / "a")
    model, alloc = fresh()
    with pytest.raises(Crash):
        train(model, crashing, cfg, allocator=alloc, out_dir=tmp_path / "b")
    model, alloc = fresh()
    resumed = train(model, batches, cfg, allocator=alloc, out_dir=tmp_path / "b", resume=True)
    assert [r["loss"] for r in resumed.loss_log] == [r["loss"] for r in full.loss_log]
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 18
    if config == "DRaFT-Q":
        assert any(r != 4 for r in saved["ranks"].values())   # the ranks did change during the run


def test_summary_of_foreign_or_missing_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        write_summary(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps({"final_loss": 1.5, "steps": 3}))
    (tmp_path / "not-a-run").mkdir()
    csv_path, _ = write_summary(tmp_path)
    with open(csv_path) as f:
        (row,) = list(csv.DictReader(f))
    assert row["run"] == "other" and row["final_loss"] == "1.5" and row["steps"] == "3"
    assert row["config"] == MISSING and row["tokens_per_s"] == MISSING      # stated, never an empty cell
    assert not list(tmp_path.glob(".*.tmp"))


def test_summarization_evaluator_scores_greedy_continuations():
    """ROUGE-L of what the model generates after each prompt, against the references."""
    class Chars:                                     # token i <-> the character chr(97 + i % 26)
        eos_id = 0

        def decode(self, ids):
            return " ".join(chr(97 + i % 26) for i in ids)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 97, (6,), generator=g).tolist() for _ in range(3)]
    model = tiny_lm().eval()
    continuations = [model.generate(torch.tensor([p]), 4, temperature=0.0)[0, 6:].tolist() for p in prompts]
    refs = [Chars().decode(c[:c.index(0)] if 0 in c else c) for c in continuations]
    refs[2] = "zzz qqq"                              # one reference the model cannot match
    cols = {"input_ids": prompts, "labels": prompts, "prompt_ids": prompts, "references": refs}
    task = TaskData(spec=get_task("news_summary"), train=cols, eval=cols, pad_id=0, max_length=12, block_size=12,
                    source="synthetic", eval_from="synthetic")
    got = make_evaluator(task, tokenizer=Chars(), max_new_tokens=4)(model)
    assert got["rouge_l"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- all or nothing

def snapshot(folder):
    """{relative path: bytes} of every file under folder (hidden ones too)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Boom(Exception):
    pass


def failing_evaluate(model):
    raise Boom()


def test_a_failed_run_leaves_no_folder_behind(tmp_path):
    """Setup or training fails before any checkpoint: the folder (and the parents it made) go."""
    with pytest.raises(ValueError, match="give target_modules"):      # prepare() fails after config.json
        run_experiment(CONFIGS["B-FP"], nn.Sequential(nn.Linear(4, 4)), synthetic_task(),
                       TrainConfig(steps=2, device="cpu"), tmp_path / "new" / "a")
    assert not (tmp_path / "new").exists()
    task = synthetic_task()
    cfg = TrainConfig(steps=4, batch_size=8, eval_every=2, progress=False, device="cpu")
    with pytest.raises(Boom):
        run_experiment(CONFIGS["B-FP"], tiny_lm(), task, cfg, tmp_path / "b", failing_evaluate)
    assert not (tmp_path / "b").exists()
    run(tmp_path, "b", "B-FP", steps=2)                       # so the corrected call is not refused


def test_a_failed_overwrite_puts_the_old_run_back(tmp_path):
    run(tmp_path, "a", "B-FP", steps=2)
    (tmp_path / "a" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path / "a")
    task = synthetic_task()
    cfg = TrainConfig(steps=4, batch_size=8, eval_every=2, progress=False, device="cpu")
    with pytest.raises(Boom):
        run_experiment(CONFIGS["Full-FT"], tiny_lm(), task, cfg, tmp_path / "a", failing_evaluate, overwrite=True)
    assert snapshot(tmp_path / "a") == before                # same files, same bytes, nothing hidden left
    run(tmp_path, "a", "Full-FT", steps=2, overwrite=True)
    assert (tmp_path / "a" / "model.safetensors").exists()
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []   # the replaced run is gone


def test_a_run_stopped_after_a_checkpoint_is_kept_for_resume(tmp_path):
    """Failure after checkpoint.pt exists: config.json and the checkpoint stay; the folder refuses a
    new run (naming --resume), overwrite refuses to delete the checkpoint, resume finishes the run
    to the losses of a run that never stopped."""
    from trainers.results import check_run_dir, run_state
    task = synthetic_task()
    cfg = TrainConfig(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, checkpoint_every=3,
                      progress=False, device="cpu")
    full = run_experiment(CONFIGS["B-FP"], tiny_lm(), task, cfg, tmp_path / "full")
    calls = []

    def evaluate(model):                                       # the final evaluation fails once
        calls.append(1)
        raise Boom()
    with pytest.raises(Boom):
        run_experiment(CONFIGS["B-FP"], tiny_lm(), task, cfg, tmp_path / "b", evaluate)
    assert run_state(tmp_path / "b") == "resumable"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.pt", "config.json"]
    with pytest.raises(FileExistsError, match="--resume"):
        check_run_dir(tmp_path / "b")
    with pytest.raises(FileExistsError, match="does not delete a checkpoint"):
        run_experiment(CONFIGS["B-FP"], tiny_lm(), task, cfg, tmp_path / "b", overwrite=True)
    with pytest.raises(ValueError, match="train.lr"):       # resuming with other settings is refused
        run_experiment(CONFIGS["B-FP"], tiny_lm(), task, dataclasses.replace(cfg, lr=0.5), tmp_path / "b",
                       resume=True)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.pt", "config.json"]
    row = run_experiment(CONFIGS["B-FP"], tiny_lm(), task, cfg, tmp_path / "b", resume=True)
    assert row["final_loss"] == full["final_loss"]
    assert (tmp_path / "b" / "loss_log.csv").read_text() == (tmp_path / "full" / "loss_log.csv").read_text()
    with pytest.raises(FileNotFoundError, match="finished"):
        run_experiment(CONFIGS["B-FP"], tiny_lm(), task, cfg, tmp_path / "b", resume=True)
