"""Data tasks: the readers on the real files of shared/data (counts from PROVENANCE.md), packing,
QA span mapping (offsets vs prefix tokenization), summarization masks, and the errors."""
import csv
import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from trainers.data import DataUnavailable, TASKS, load_task, read_raw
from trainers.data import readers, source
from trainers.data.readers import clean_ag_news, split_shakespeare, wikitext_articles
from trainers.data.spans import answer_span, fit
from trainers.data.tasks import IGNORE_INDEX, pack


# ---------------------------------------------------------------- tokenizers built here

class BPE:
    """A byte-level BPE trained here with `tokenizers`; `backend` exposes offsets for QA."""

    def __init__(self, tk: Tokenizer, expose_backend: bool = True):
        self._tk = tk
        self.eos_id = self.bos_id = tk.token_to_id("<|endoftext|>")
        self.pad_id = self.cls_id = self.sep_id = None
        self.vocab_size = tk.get_vocab_size()
        if expose_backend:
            self.backend = tk

    def encode(self, text, pair=None):
        return self._tk.encode(text, pair).ids

    def decode(self, ids):
        return self._tk.decode(list(ids))


class Bytes:
    """UTF-8 bytes + 3; 0 pad, 1 BOS, 2 EOS; a pair is BOS a EOS b EOS. No offsets."""
    pad_id, bos_id, eos_id, vocab_size, cls_id, sep_id = 0, 1, 2, 259, None, None

    def encode(self, text, pair=None):
        ids = [1] + [b + 3 for b in text.encode()] + [2]
        return ids + [b + 3 for b in pair.encode()] + [2] if pair is not None else ids

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def bpe_tk(shared_data):
    squad = json.loads((shared_data / "squad_v1.1" / "dev-v1.1.json").read_text())
    texts = [p["context"] for a in squad["data"][:20] for p in a["paragraphs"]]
    texts += (shared_data / "tiny_shakespeare" / "input.txt").read_text()[:100_000].split("\n\n")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    return tk


@pytest.fixture(scope="module")
def bpe(bpe_tk):
    return BPE(bpe_tk)


# ---------------------------------------------------------------- readers on the real files

def _count(records, label):
    return sum(r["label"] == label for r in records)


def test_sst2_counts_labels_and_trailing_space(shared_data):
    raw = read_raw("sst2", data_dir=shared_data)
    assert (len(raw.train), len(raw.eval)) == (67_349, 872)
    assert (_count(raw.train, 1), _count(raw.train, 0)) == (37_569, 29_780)
    assert (_count(raw.eval, 1), _count(raw.eval, 0)) == (444, 428)
    assert all(r["text"] and r["text"] == r["text"].strip() for r in raw.train + raw.eval)
    assert raw.train[0] == {"text": "hide new secretions from the parental units", "label": 0}
    assert not raw.carved and raw.eval_from == "sst2/dev.tsv"


def test_glue_tsv_reader_handles_crlf_and_bare_quotes(shared_data):
    header, rows = readers.read_tsv(shared_data / "sst2" / "test-labeled.tsv")   # the CRLF file
    assert header == ["sentence", "label"] and len(rows) == 1_821
    assert {r[1] for r in rows} == {"0", "1"}                                   # no "\r" left on labels
    assert (sum(r[1] == "1" for r in rows), sum(r[1] == "0" for r in rows)) == (904, 917)


def test_mrpc_bom_gone_and_counts(shared_data):
    raw = read_raw("mrpc", data_dir=shared_data)
    assert (len(raw.train), len(raw.eval)) == (3_668, 408)
    assert (_count(raw.train, 1), _count(raw.train, 0)) == (2_474, 1_194)
    assert (_count(raw.eval, 1), _count(raw.eval, 0)) == (279, 129)
    assert raw.train[0]["text"].startswith("Amrozi accused his brother") and raw.train[0]["label"] == 1
    assert '" the witness "' in raw.train[0]["text"]                            # bare quotes kept (QUOTE_NONE)
    assert all(r["text"] and r["text_pair"] and "\ufeff" not in r["text"] for r in raw.train + raw.eval)


def test_ag_news_carved_unescaped_zero_based(shared_data, caplog):
    with caplog.at_level(logging.WARNING, logger="trainers.data"):
        raw = read_raw("ag_news", data_dir=shared_data, seed=0)
    assert raw.carved and "test.csv" in raw.note and "carved" in caplog.text
    both = raw.train + raw.eval
    assert len(both) == 7_600 and {r["label"] for r in both} == {0, 1, 2, 3} and all(r["text"] for r in both)
    assert all(_count(both, c) == 1_900 and _count(raw.eval, c) == 380 for c in range(4))
    for bad in ("#39;", "quot;", "#36;", "&lt;", "&gt;", "amp;", "\\"):
        assert not any(bad in r["text"] for r in both), bad
    texts = {r["text"][:40]: r for r in both}
    space = texts["The Race is On: Second Private Team Sets"]
    assert space["label"] == 3 and "A second team of rocketeers" in space["text"]   # "\" was a newline
    assert "the $10 million Ansari X Prize" in space["text"]                    # " #36;" was "$"
    assert {r["text"] for r in read_raw("ag_news", data_dir=shared_data, seed=0).eval} == \
        {r["text"] for r in raw.eval}                                           # seeded
    assert {r["text"] for r in read_raw("ag_news", data_dir=shared_data, seed=1).eval} != \
        {r["text"] for r in raw.eval}


def test_clean_ag_news_by_hand():
    assert clean_ag_news(r"Johnson  amp; Johnson said  quot;no quot;\it #39;s  #36;5 &lt;b&gt;") == \
        "Johnson & Johnson said \"no\" it's $5 <b>"


def test_wikitext_articles_and_lines(shared_data):
    raw = read_raw("wikitext2", data_dir=shared_data)
    assert raw.eval_from == "wikitext2/wiki.test.raw" and "wiki.train.raw" in raw.note
    lines = (shared_data / "wikitext2" / "wiki.valid.raw").read_text().split("\n")
    kept = [ln.strip() for ln in lines if ln.strip()]
    got = [ln for art in raw.train for ln in art["text"].split("\n")]
    assert got == kept                                                          # nothing lost, nothing added
    assert all(art["text"].startswith("= ") and not art["text"].startswith("= =") for art in raw.train)
    assert raw.train[0]["text"].split("\n")[0] == "= Homarus gammarus ="
    assert wikitext_articles([" ", " = A = ", " ", " x ", " = = B = = ", " y ", " = C = "]) == \
        [{"text": "= A =\nx\n= = B = =\ny"}, {"text": "= C ="}]


def test_tiny_shakespeare_split(shared_data):
    raw = read_raw("tiny_shakespeare", data_dir=shared_data)
    text = (shared_data / "tiny_shakespeare" / "input.txt").read_text()
    train, eval_ = raw.train[0]["text"], raw.eval[0]["text"]
    assert train + eval_ == text and len(text) == 1_115_394
    assert 0.88 < len(train) / len(text) <= 0.9 and train.endswith("\n\n") and raw.carved
    assert split_shakespeare("a\n\nb\n\nc", 0.9) == ("a\n\nb\n\n", "c")


def test_squad_carved_by_article(shared_data):
    raw = read_raw("squad", data_dir=shared_data, seed=0)
    assert len(raw.train) + len(raw.eval) == 10_570 and raw.carved
    assert not {r["title"] for r in raw.train} & {r["title"] for r in raw.eval}
    assert len({r["title"] for r in raw.eval}) == 10
    for r in raw.train[:500] + raw.eval[:500]:
        assert r["question"] and r["answers"]
        for a in r["answers"]:
            assert r["context"][a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]


# ---------------------------------------------------------------- errors

def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="unknown task 'sst3'; known tasks: .*squad, sst2"):
        load_task("sst3", Bytes())
    with pytest.raises(KeyError, match="ag_news"):
        read_raw("nope")


@pytest.mark.parametrize("name,file,layout", [("qnli", "qnli/train.tsv", "question<TAB>sentence"),
                                              ("imdb", "imdb/train", "{pos,neg}")])
def test_missing_local_files_name_file_and_layout(tmp_path, name, file, layout):
    with pytest.raises(DataUnavailable) as err:
        read_raw(name, data_dir=tmp_path, source="local")
    assert file in str(err.value) and layout in str(err.value) and str(tmp_path) in str(err.value)


def test_auto_offline_fails_fast_with_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")       # as on a machine without network
    with pytest.raises(DataUnavailable, match="qnli/dev.tsv.*not reachable"):
        read_raw("qnli", data_dir=tmp_path)
    with pytest.raises(DataUnavailable, match="no hub dataset"):
        read_raw("news_summary", source="hub")


def test_local_layouts_of_tasks_without_shipped_files(tmp_path):
    (tmp_path / "qnli").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "qnli" / f"{split}.tsv").write_text(
            'index\tquestion\tsentence\tlabel\n0\tWhat is "x"?\tx is y .\tentailment\n'
            "1\tWho?\tNobody .\tnot_entailment\n")
    raw = read_raw("qnli", data_dir=tmp_path, source="local")
    assert raw.train == [{"text": 'What is "x"?', "text_pair": "x is y .", "label": 0},
                         {"text": "Who?", "text_pair": "Nobody .", "label": 1}]
    for split, sub, label in (("train", "pos", 1), ("train", "neg", 0), ("test", "pos", 1), ("test", "neg", 0)):
        (tmp_path / "imdb" / split / sub).mkdir(parents=True)
        (tmp_path / "imdb" / split / sub / "0_7.txt").write_text(f"{sub} one.<br /><br />Two.")
    raw = read_raw("imdb", data_dir=tmp_path)
    assert raw.eval == [{"text": "neg one.  Two.", "label": 0}, {"text": "pos one.  Two.", "label": 1}]


# ---------------------------------------------------------------- tokenized tasks

def test_classification_batches_padded_and_seeded(shared_data, bpe):
    data = load_task("sst2", bpe, max_length=16, limit=40, data_dir=shared_data)
    raw = read_raw("sst2", data_dir=shared_data)
    assert data.num_examples("train") == data.num_examples("eval") == 40
    assert data.train["labels"] == [r["label"] for r in raw.train[:40]]
    seen = []
    for batch in data.batches("train", batch_size=16, shuffle=True, seed=3):
        ids, mask = batch["input_ids"], batch["attention_mask"]                 # (B, T)
        assert ids.shape == mask.shape and ids.shape[1] <= 16 and batch["labels"].shape == (ids.shape[0],)
        assert (ids[mask == 0] == data.pad_id).all() and (mask.sum(1) > 0).all()
        seen += batch["index"].tolist()
        for row, i in zip(ids, batch["index"].tolist()):
            assert row[:len(data.train["input_ids"][i])].tolist() == data.train["input_ids"][i]
    assert sorted(seen) == list(range(40))
    again = [b["index"].tolist() for b in data.batches("train", 16, shuffle=True, seed=3)]
    assert sum(again, []) == seen and sum(again, []) != list(range(40))


def test_pair_truncation_keeps_both_texts(shared_data):
    data = load_task("mrpc", Bytes(), max_length=40, limit=20, data_dir=shared_data)
    for ids in data.train["input_ids"]:
        assert len(ids) <= 40 and ids[0] == 1 and ids.count(2) == 2 and ids[-1] == 2   # BOS a EOS b EOS
    assert fit(Bytes(), "abc", None, 4) == [1, ord("a") + 3, ord("b") + 3, 2]    # the EOS stays last


def test_packing_blocks_and_limit_prefix(shared_data, bpe):
    docs = [{"text": "one two three"}, {"text": "four five"}]
    blocks = pack(Bytes(), docs, 5, None)
    stream = Bytes().encode("one two three") + Bytes().encode("four five")
    assert blocks == [stream[i:i + 5] for i in range(0, len(stream) - 4, 5)]  # remainder dropped
    long_doc = [{"text": (shared_data / "tiny_shakespeare" / "input.txt").read_text()[:60_000]}]
    full = pack(bpe, long_doc, 32, None)
    assert pack(bpe, long_doc, 32, 10) == full[:10]                           # prefix encoding = full encoding
    data = load_task("tiny_shakespeare", bpe, block_size=32, limit=6, data_dir=shared_data)
    batch = next(data.batches("train", batch_size=4))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].all() and data.num_examples("eval") == 6
    assert bpe.decode(sum(data.train["input_ids"], [])).startswith("First Citizen:\nBefore we proceed")


def _check_spans(data, tok):
    n = data.num_examples("train")
    assert n > 0
    for i in range(n):
        ids, s, e = data.train["input_ids"][i], data.train["start_positions"][i], data.train["end_positions"][i]
        assert len(ids) <= data.max_length and 0 <= s <= e < len(ids)
        assert tok.decode(ids[s:e + 1]).strip() == data.train["answers"][i][0]


def test_qa_spans_offsets_and_prefix_agree(shared_data, bpe_tk):
    with_offsets = load_task("squad", BPE(bpe_tk), max_length=96, limit=60, data_dir=shared_data)
    by_prefix = load_task("squad", BPE(bpe_tk, expose_backend=False), max_length=96, limit=60,
                          data_dir=shared_data)
    _check_spans(with_offsets, BPE(bpe_tk))
    assert by_prefix.train["input_ids"] == with_offsets.train["input_ids"]  # same windows (same seed)
    assert by_prefix.train["start_positions"] == with_offsets.train["start_positions"]
    assert by_prefix.train["end_positions"] == with_offsets.train["end_positions"]
    batch = next(with_offsets.batches("eval", batch_size=5))
    assert batch["labels"].shape == (5, 2) and torch.equal(batch["labels"][:, 0], batch["start_positions"])
    tok = Bytes()                                      # BOS/EOS around each text, no offsets at all
    _check_spans(load_task("squad", tok, max_length=200, limit=40, data_dir=shared_data), tok)


def test_answer_span_inside_a_token(bpe_tk):
    """An answer that ends inside a token ("1990" of "1990s") maps to the token that holds it,
    by offsets and by prefix tokenization alike."""
    context = "It was built in the 1990s by workers."
    start = context.index("1990")
    spans = [answer_span(BPE(bpe_tk, expose), "When?", context, start, start + 4)
             for expose in (True, False)]
    assert spans[0] == spans[1]
    ids, s, e = spans[0]
    assert "1990" in BPE(bpe_tk).decode(ids[s:e + 1]) and len(BPE(bpe_tk).decode(ids[s:e + 1])) <= 8


def test_summarization_loss_on_headline_only(tmp_path, bpe):
    (tmp_path / "news_summary").mkdir()
    with open(tmp_path / "news_summary" / "news_summary_more.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["headlines", "text"])
        for i in range(10):
            w.writerow([f"Team {i} wins, again", f"The team number {i} won the final, " + "and then more. " * 30])
    data = load_task("news_summary", bpe, max_length=48, data_dir=tmp_path)
    assert data.carved and data.num_examples("train") + data.num_examples("eval") == 10
    for ids, labels, prompt, ref in zip(*(data.train[k] for k in ("input_ids", "labels", "prompt_ids", "references"))):
        assert len(ids) <= 48 and len(labels) == len(ids) and ids[:len(prompt)] == prompt
        target = [t for t in labels if t != IGNORE_INDEX]
        assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt) and ids[len(prompt):] == target
        assert bpe.decode(target) == f" {ref}<|endoftext|>" or bpe.decode(target) == f" {ref}"
        assert bpe.decode(prompt).endswith(" TL;DR:") and bpe.decode(prompt).startswith("The team number")
    batch = next(data.batches("train", batch_size=3))
    assert ((batch["labels"] == IGNORE_INDEX) | (batch["labels"] == batch["input_ids"])).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_registry_specs():
    assert set(TASKS) == {"sst2", "mrpc", "qnli", "ag_news", "imdb", "wikitext2", "tiny_shakespeare",
                          "squad", "news_summary"}
    assert TASKS["ag_news"].num_labels == 4 and TASKS["squad"].kind == "qa"
    assert all(s.kind in ("classification", "pair_classification", "lm", "qa", "summarization")
               for s in TASKS.values())


def test_with_the_project_tokenizers(shared_data, stories260k):
    tokenization = pytest.importorskip("trainers.tokenization")
    tok = tokenization.load_tokenizer(stories260k / "tok512.bin")          # llama2.c: BOS, no offsets
    _check_spans(load_task("squad", tok, max_length=160, limit=20, data_dir=shared_data), tok)
    data = load_task("tiny_shakespeare", tok, block_size=64, limit=4, data_dir=shared_data)
    assert [len(b) for b in data.train["input_ids"]] == [64] * 4
    squad = json.loads((shared_data / "squad_v1.1" / "dev-v1.1.json").read_text())
    bpe = tokenization.train_bpe_tokenizer([p["context"] for a in squad["data"][:10] for p in a["paragraphs"]],
                                           vocab_size=600)                  # HFTokenizer: offsets path
    _check_spans(load_task("squad", bpe, max_length=96, limit=20, data_dir=shared_data), bpe)


def test_qa_predictions_recover_answers_from_logits(shared_data, bpe):
    from trainers.metrics import squad_scores
    data = load_task("squad", bpe, max_length=96, limit=12, data_dir=shared_data)
    batch = next(data.batches("eval", batch_size=12))
    B, T = batch["input_ids"].shape
    start = torch.randn(B, T)                                   # noise, with the true span on top
    end = torch.randn(B, T)
    start[torch.arange(B), batch["start_positions"]] = 10.0
    end[torch.arange(B), batch["end_positions"]] = 10.0
    preds = data.qa_predictions("eval", batch["index"], start, end, bpe)
    refs = [data.eval["answers"][i] for i in batch["index"].tolist()]
    assert squad_scores(preds, refs) == {"exact_match": 1.0, "f1": 1.0}
    for i in batch["index"].tolist():                           # the context starts after the question
        ids, lo = data.eval["input_ids"][i], data.eval["context_start"][i]
        assert bpe.decode(ids[lo:]).strip() == data.eval["contexts"][i]


def test_hub_path_converts_rows(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {
        ("nyu-mll/glue", "sst2"): {"train": [{"sentence": "good film ", "label": 1, "idx": 0}],
                                   "validation": [{"sentence": "bad ", "label": 0, "idx": 0}]},
        ("Salesforce/wikitext", "wikitext-2-raw-v1"): {
            "train": [{"text": ""}, {"text": " = T = \n"}, {"text": " a b \n"}],
            "validation": [{"text": " = V = \n"}, {"text": " c \n"}]},
        ("rajpurkar/squad", None): {s: [{"id": "1", "title": "t", "context": "x y z", "question": "q? ",
                                         "answers": {"text": ["y"], "answer_start": [2]}}]
                                    for s in ("train", "validation")},
    }
    calls = []

    def fake_load_dataset(ds_id, config=None):
        calls.append((ds_id, config))
        return rows[(ds_id, config)]
    monkeypatch.setattr(source, "hub_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = read_raw("sst2", source="hub")
    assert raw.train == [{"text": "good film", "label": 1}] and raw.source == "hub:nyu-mll/glue/sst2"
    raw = read_raw("wikitext2", source="hub")
    assert raw.train == [{"text": "= T =\na b"}] and raw.eval == [{"text": "= V =\nc"}]
    raw = read_raw("squad", data_dir=None, source="hub")
    assert raw.eval[0]["answers"] == [{"text": "y", "answer_start": 2}] and raw.eval[0]["question"] == "q?"
    assert calls == [("nyu-mll/glue", "sst2"), ("Salesforce/wikitext", "wikitext-2-raw-v1"), ("rajpurkar/squad", None)]


def test_hub_offline_without_cache_fails_fast(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    for module, flag in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):  # read_hub sets them: restore after
        monkeypatch.setattr(module, flag, getattr(module, flag))

    def offline_load_dataset(ds_id, config=None):
        raise ConnectionError("offline mode is enabled")   # what datasets raises without a cached copy
    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    with pytest.raises(DataUnavailable, match="nyu-mll/glue.*hub reachable: False.*offline mode"):
        read_raw("qnli", source="hub")


# ---------------------------------------------------------------- damaged files name the file and the line

def _write(root, rel, text, binary=False):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if binary else path.write_text(text, encoding="utf-8")
    return path


GOOD_SST2 = "sentence\tlabel\nfine film \t1\n"


@pytest.mark.parametrize("bad, match", [
    ("positive", r"sst2/train.tsv: line 4: column 'label' must be one of \[0, 1\], got 'positive'"),
    ("2", r"sst2/train.tsv: line 4: column 'label' must be one of \[0, 1\], got '2'")])
def test_sst2_bad_label_names_file_line_and_value(tmp_path, bad, match):
    _write(tmp_path, "sst2/dev.tsv", GOOD_SST2)
    _write(tmp_path, "sst2/train.tsv", f"sentence\tlabel\nok\t0\n\nbad\t{bad}\n")   # a blank line 3 counts
    with pytest.raises(ValueError, match=match):
        read_raw("sst2", data_dir=tmp_path, source="local")


def test_tsv_field_count_names_the_file_line(tmp_path):
    _write(tmp_path, "sst2/train.tsv", GOOD_SST2)
    _write(tmp_path, "sst2/dev.tsv", "sentence\tlabel\n\nok\t0\nno tab here\n")
    with pytest.raises(ValueError, match=r"sst2/dev.tsv: line 4 has 1 fields, header has 2"):
        read_raw("sst2", data_dir=tmp_path, source="local")


def test_mrpc_and_qnli_bad_labels(tmp_path):
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    _write(tmp_path, "mrpc/train.tsv", head + "1\ta\tb\tx\ty\n")
    _write(tmp_path, "mrpc/dev.tsv", head + "yes\ta\tb\tx\ty\n")
    with pytest.raises(ValueError, match=r"mrpc/dev.tsv: line 2: column 'Quality' must be one of \[0, 1\], got 'yes'"):
        read_raw("mrpc", data_dir=tmp_path, source="local")
    head = "index\tquestion\tsentence\tlabel\n"
    _write(tmp_path, "qnli/train.tsv", head + "0\tq\ts\tneutral\n")
    _write(tmp_path, "qnli/dev.tsv", head + "0\tq\ts\tentailment\n")
    with pytest.raises(ValueError, match=r"qnli/train.tsv: line 2: column 'label' must be one of "
                                         r"\['entailment', 'not_entailment'\], got 'neutral'"):
        read_raw("qnli", data_dir=tmp_path, source="local")


@pytest.mark.parametrize("cls", ["5", "0", "x"])
def test_ag_news_class_out_of_range_names_the_line(tmp_path, cls):
    _write(tmp_path, "ag_news/test.csv", '"3","T","multi\nline"\n' + f'"{cls}","T","D"\n')
    with pytest.raises(ValueError, match=rf"ag_news/test.csv: line 3: column 'class' must be one of "
                                         rf"\[1, 2, 3, 4\], got '{cls}'"):
        read_raw("ag_news", data_dir=tmp_path, source="local")


def test_squad_json_errors_name_the_file_and_the_place(tmp_path):
    path = _write(tmp_path, "squad_v1.1/dev-v1.1.json", '{"data": [')
    with pytest.raises(ValueError, match=r"dev-v1.1.json: not valid JSON: line 1"):
        read_raw("squad", data_dir=tmp_path, source="local")
    art = {"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "c"}]}]}]}
    path.write_text(json.dumps({"data": [art]}))
    with pytest.raises(ValueError, match=r"dev-v1.1.json: data\[0\].paragraphs\[0\].qas\[0\].answers\[0\]"
                                         r".answer_start must be an int, got None"):
        read_raw("squad", data_dir=tmp_path, source="local")


def test_non_utf8_text_names_the_file_and_byte(tmp_path):
    _write(tmp_path, "wikitext2/wiki.valid.raw", b" = A = \n text \xff\xfe more\n", binary=True)
    _write(tmp_path, "wikitext2/wiki.test.raw", " = B = \n")
    with pytest.raises(ValueError, match=r"wiki.valid.raw: not utf-8 text: byte 14"):
        read_raw("wikitext2", data_dir=tmp_path, source="local")


def test_news_summary_short_row_names_the_line(tmp_path):
    _write(tmp_path, "news_summary/news_summary_more.csv", "headlines,text\nh1,t1\nh2\nh3,t3\n")
    with pytest.raises(ValueError, match=r"news_summary_more.csv: line 3: fewer fields than the 2 of the header"):
        read_raw("news_summary", data_dir=tmp_path, source="local")
