"""Tokenizers: llama2.c tok512.bin (against a literal transcription of run.c's merge loop),
byte-level BPE and WordPiece built here with the `tokenizers` library (no hub), BPE training."""
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.tokenization import HFTokenizer, Llama2cTokenizer, load_tokenizer, train_bpe_tokenizer


CORPUS = ["the cat sat on the mat.", "the dog sat on the log!", "a cat and a dog, the best of friends.",
          "once upon a time there was a little cat.", "the end of the story of the cat and the dog."] * 20


# ----------------------------------------------------------------------------- llama2.c

@pytest.fixture(scope="module")
def tok512(stories260k):
    return Llama2cTokenizer.from_file(stories260k / "tok512.bin")


def run_c_encode(tok, text):
    """llama2.c run.c `encode`, transcribed literally: rescan every pair after each merge."""
    ids = [tok.bos_id] + ([tok.ids[b" "]] if text else [])
    for ch in text:
        b = ch.encode("utf-8")
        ids += [tok.ids[b]] if b in tok.ids else [x + 3 for x in b]
    while True:
        best = (-1e10, -1, -1)  # score, id, index
        for i in range(len(ids) - 1):
            merged = tok.ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if merged is not None and tok.scores[merged] > best[0]:
                best = (tok.scores[merged], merged, i)
        if best[2] == -1:
            return ids
        ids[best[2]:best[2] + 2] = [best[1]]


TEXTS = st.text(alphabet=st.sampled_from(list("abcdeilnorstuy .,!'\nLOT") + ["é", "ß", "🙂", "中"]), max_size=40)


@settings(max_examples=40, deadline=None)
@given(text=TEXTS)
def test_llama2c_encode_matches_run_c_and_round_trips(tok512, text):
    ids = tok512.encode(text)
    assert ids == run_c_encode(tok512, text)
    assert tok512.decode(ids) == text
    assert tok512.decode(tok512.encode(text, bos=False)) == text


def test_llama2c_specials_byte_fallback_and_pairs(tok512):
    assert tok512.encode("") == [1]
    assert tok512.encode("hi", eos=True)[-1] == tok512.eos_id
    assert tok512.encode("🙂") == [1, tok512.ids[b" "]] + [b + 3 for b in "🙂".encode()]
    once = tok512.ids[b" Once"]
    assert tok512.decode([1, once]) == "Once"  # the leading space goes after BOS...
    assert tok512.decode([1, once, once]) == "Once Once"  # ...and only there
    assert tok512.decode([1, 3 + 10]) == "\n"  # <0x0A>
    a, b = tok512.encode("a cat"), tok512.encode("the dog", bos=False)
    assert tok512.encode("a cat", pair="the dog") == a + b


def test_llama2c_bad_files(tmp_path, stories260k):
    raw = (stories260k / "tok512.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="not a valid llama2.c tokenizer"):
        Llama2cTokenizer.from_file(tmp_path / "cut.bin")
    (tmp_path / "junk.bin").write_bytes(struct.pack("<ifi", 7, 0.0, 1000) + b"x" * 50)
    with pytest.raises(ValueError, match="length 1000"):
        Llama2cTokenizer.from_file(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="holds 512 tokens, expected 600"):
        Llama2cTokenizer.from_file(stories260k / "tok512.bin", vocab_size=600)
    assert load_tokenizer(stories260k / "tok512.bin").vocab_size == 512


# ----------------------------------------------------------------------------- byte-level BPE

@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


def test_trained_bpe_is_lossless_and_learns_frequent_words(bpe):
    assert 256 < bpe.vocab_size <= 300
    assert bpe.eos_id == bpe.bos_id == bpe.tokenizer.token_to_id("<|endoftext|>") and bpe.pad_id is None
    assert len(bpe.encode(" the")) == 1 and len(bpe.encode(" cat")) == 1
    for text in ["the cat sat.", "Unseen wörds, 中文 and 🙂 too!\n\ttabs", ""]:
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_from_files_equals_from_texts(tmp_path, bpe):
    file = tmp_path / "corpus.txt"
    file.write_text("\n".join(CORPUS) + "\n")
    from_file = train_bpe_tokenizer([file], vocab_size=300)
    assert from_file.encode("the cat and the dog") == bpe.encode("the cat and the dog")
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(TypeError, match=r"only texts \(str\) or only files.*got .*\['\w*Path', 'str'\]"):
        train_bpe_tokenizer(["text", file], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        train_bpe_tokenizer([tmp_path / "absent.txt"], vocab_size=300)


def test_bpe_loads_the_same_from_tokenizer_json_and_from_vocab_merges(tmp_path, bpe):
    bpe.save(tmp_path / "tokenizer.json")
    (tmp_path / "split").mkdir()
    bpe.tokenizer.model.save(str(tmp_path / "split"))  # vocab.json + merges.txt
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["merges.txt", "vocab.json"]
    text = "the cat sat on a little log, once upon a time!"
    expected = bpe.encode(text)
    for source in (tmp_path / "tokenizer.json", tmp_path, tmp_path / "split"):
        tok = load_tokenizer(source)
        assert isinstance(tok, HFTokenizer)
        assert tok.encode(text) == expected and tok.decode(expected) == text
        assert tok.eos_id == bpe.eos_id


# ----------------------------------------------------------------------------- WordPiece

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", ",", "un", "##aff", "##able", "world", "!",
         "the", "cat", "sat", "##s", "."]


@pytest.fixture
def wordpiece_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return tmp_path


def test_wordpiece_template_special_ids_and_decode(wordpiece_dir):
    tok = load_tokenizer(wordpiece_dir)
    v = {t: i for i, t in enumerate(VOCAB)}
    assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.bos_id, tok.eos_id) == (2, 3, 0, None, None)
    ids = tok.encode("Hello, UNAFFABLE world!")
    assert ids == [v[t] for t in ["[CLS]", "hello", ",", "un", "##aff", "##able", "world", "!", "[SEP]"]]
    assert tok.encode("the cats", pair="zebra sat.") == \
        [2, v["the"], v["cat"], v["##s"], 3, v["[UNK]"], v["sat"], v["."], 3]
    assert tok.decode(ids) == "hello, unaffable world!"
    ids, offsets, which = tok.encode_with_offsets("the cats", pair="hello")
    assert which == [None, 0, 0, 0, None, 1, None]
    assert [("the cats"[a:b] if s == 0 else "hello"[a:b]) for (a, b), s in zip(offsets, which) if s is not None] \
        == ["the", "cat", "s", "hello"]


def test_wordpiece_keeps_case_when_the_config_says_so(wordpiece_dir):
    (wordpiece_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    tok = load_tokenizer(wordpiece_dir)
    assert tok.encode("Hello hello") == [2, 1, 5, 3]


def test_missing_and_corrupt_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files .* found nothing"):
        HFTokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.*neither a local folder nor a hub id"):
        load_tokenizer(str(tmp_path / "nowhere" / "x"))


@pytest.mark.ref
def test_same_ids_as_transformers_tokenizers(tmp_path, wordpiece_dir, bpe):
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertTokenizer.from_pretrained(str(wordpiece_dir))
    ours = load_tokenizer(wordpiece_dir)
    for a, b in [("Hello, unaffable world!", None), ("the cats", "zebra sat.")]:
        assert ours.encode(a, pair=b) == bert(a, b)["input_ids"]
    (tmp_path / "bpe").mkdir()
    bpe.tokenizer.model.save(str(tmp_path / "bpe"))
    gpt2 = transformers.GPT2Tokenizer.from_pretrained(str(tmp_path / "bpe"))
    ours = load_tokenizer(tmp_path / "bpe")
    for text in ["the cat sat on the mat.", " leading space,  double  spaces and é 🙂"]:
        assert ours.encode(text) == gpt2(text)["input_ids"]
