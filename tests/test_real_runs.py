"""Real runs on the offline data (shared/data; skipped when absent): a real pretrained
checkpoint (stories260K) fine-tuned on real text, a real classification task end to end
through the command line, and the matrix runner."""
import csv
import json

import pytest

import trainers.__main__ as cli
from trainers.experiments import (RunSettings, get_config, load_model, load_task_for, make_evaluator,
                                  run_experiment, run_matrix)
from trainers.results import MISSING, SUMMARY_COLUMNS
from trainers.train import TrainConfig


def shakespeare_run(tmp_path, data_dir, config):
    model, tok = load_model("stories260K", "tiny_shakespeare", max_length=64, data_dir=data_dir)
    data = load_task_for("tiny_shakespeare", tok, max_length=64, limit=160, data_dir=data_dir)
    evaluate = make_evaluator(data, max_examples=48)
    model.eval()
    before = evaluate(model)["perplexity"]
    model.train()
    cfg = TrainConfig(steps=40, batch_size=8, lr=5e-3, warmup_steps=4, eval_every=0, progress=False,
                      device="cpu")
    row = run_experiment(get_config(config), model, data, cfg, tmp_path / config, evaluate,
                         model_name="stories260K")
    return before, row


@pytest.mark.parametrize("config", ["B-FP", pytest.param("B-Q4", marks=pytest.mark.slow)])
def test_stories260k_lora_on_tiny_shakespeare_lowers_perplexity(tmp_path, stories260k, shared_data, config):
    before, row = shakespeare_run(tmp_path, shared_data, config)
    assert row["metric"] == "perplexity"
    assert row["metric_value"] < 0.7 * before        # TinyStories -> Shakespeare: a large, quick gain
    assert 0 < row["trainable_pct"] < 5
    assert row["quant"] == (4 if config == "B-Q4" else "none")


def test_sst2_run_through_the_cli_writes_its_summary_row(tmp_path, shared_data, capsys):
    results = tmp_path / "results"
    code = cli.main(["run", "--config", "B-FP", "--task", "sst2", "--model", "gpt2-tiny",
                     "--results", str(results), "--steps", "12", "--batch-size", "8", "--limit", "96",
                     "--max-length", "48", "--eval-examples", "64", "--no-progress", "--device", "cpu",
                     "--data-dir", str(shared_data)])
    assert code == 0
    assert "accuracy" in capsys.readouterr().out
    with open(results / "experiment_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["run"] == "sst2__B-FP" and rows[0]["metric"] == "accuracy"
    assert all(v not in ("", MISSING) for v in rows[0].values())
    assert 0.0 <= float(rows[0]["metric_value"]) <= 1.0
    metrics = json.loads((results / "sst2__B-FP" / "metrics.json").read_text())
    assert metrics["trainable_params"] < metrics["total_params"]


@pytest.mark.slow
def test_matrix_on_tiny_settings_writes_one_full_row_per_run(tmp_path, shared_data):
    configs = ["B-FP", "B-Q4", "SADRA", "DRaFT-Q", "B-Ada", "Full-FT"]
    cfg = TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, progress=False, device="cpu")
    settings = RunSettings(model="gpt2-tiny", max_length=32, limit=64, eval_examples=32,
                           data_dir=str(shared_data))
    rows = run_matrix(["sst2"], configs, cfg, tmp_path, settings)
    assert len(rows) == len(configs)
    with open(tmp_path / "experiment_summary.csv") as f:
        written = list(csv.DictReader(f))
    assert sorted(r["config"] for r in written) == sorted(configs)
    assert list(written[0]) == list(SUMMARY_COLUMNS)
    for r in written:
        assert all(v not in ("", MISSING) for v in r.values()), r
    everything = json.loads((tmp_path / "all_results.json").read_text())
    assert len(everything) == len(configs)


@pytest.mark.ref
def test_a_local_hugging_face_checkpoint_folder_runs(tmp_path, shared_data):
    """--model <folder with config.json, model.safetensors, tokenizer.json> (as save_pretrained writes)."""
    transformers = pytest.importorskip("transformers")
    from trainers.experiments import _task_texts
    from trainers.tokenization import train_bpe_tokenizer
    tok = train_bpe_tokenizer(_task_texts("sst2", shared_data, limit=2000), vocab_size=300)
    folder = tmp_path / "tiny-gpt2"
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     num_labels=2, pad_token_id=0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    results = tmp_path / "results"
    code = cli.main(["run", "--config", "B-FP", "--task", "sst2", "--model", str(folder), "--results", str(results),
                     "--steps", "6", "--limit", "64", "--max-length", "48", "--eval-examples", "32",
                     "--no-progress", "--device", "cpu", "--data-dir", str(shared_data)])
    assert code == 0
    with open(results / "experiment_summary.csv") as f:
        row = next(csv.DictReader(f))
    assert row["model"] == str(folder) and row["metric"] == "accuracy"
    adapter = json.loads((results / "sst2__B-FP" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)


@pytest.mark.slow
def test_squad_run_with_a_tiny_distilbert_scores_spans(tmp_path, shared_data):
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=0, progress=False, device="cpu")
    settings = RunSettings(model="distilbert-tiny", max_length=128, limit=48, eval_examples=24,
                           data_dir=str(shared_data))
    from trainers.experiments import run_task
    row = run_task("B-FP", "squad", cfg, tmp_path / "squad", settings)
    metrics = json.loads((tmp_path / "squad" / "metrics.json").read_text())
    assert row["metric"] == "f1" and 0.0 <= metrics["f1"] <= 1.0 and 0.0 <= metrics["exact_match"] <= 1.0
