"""Tokenizers behind one small interface (named `tokenization`, since `tokenizers` is the library).

Every tokenizer here has `encode(text, pair=None) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, and the special ids `bos_id`, `eos_id`, `pad_id`, `cls_id`, `sep_id`
(None where the vocabulary has no such token).

- `HFTokenizer`: GPT-2 byte-level BPE (Sennrich et al., 2016; Radford et al., 2019) and
  BERT/DistilBERT WordPiece (Wu et al., 2016) run by the `tokenizers` library, read from
  tokenizer.json, from vocab.json + merges.txt, or from vocab.txt.
- `Llama2cTokenizer`: llama2.c's tok512.bin (a SentencePiece BPE vocabulary with scores),
  encoded the way llama2.c's run.c does it, written out here in Python.
- `train_bpe_tokenizer`: a byte-level BPE vocabulary for a corpus that has none.
`load_tokenizer(path_or_hub_id)` picks the right one from the files.
"""
from __future__ import annotations

import heapq
import json
import os
import struct
from pathlib import Path
from typing import Iterable, Protocol

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    cls_id: int | None
    sep_id: int | None

    def encode(self, text: str, pair: str | None = None) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# ----------------------------------------------------------------------------- HF files

class HFTokenizer:
    """A `tokenizers.Tokenizer` with the special ids looked up by their usual names."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer

        def first(*names):
            ids = [tokenizer.token_to_id(n) for n in names]
            return next((i for i in ids if i is not None), None)

        self.bos_id = first("<|endoftext|>", "<s>", "[CLS]") if first("[CLS]") is None else None
        self.eos_id = first("<|endoftext|>", "</s>") if first("[SEP]") is None else None
        self.pad_id = first("[PAD]", "<pad>", "<|pad|>")
        self.cls_id = first("[CLS]")
        self.sep_id = first("[SEP]")
        self.unk_id = first("[UNK]", "<unk>")
        self.mask_id = first("[MASK]", "<mask>")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> list[int]:
        """Ids of text (and pair), with the file's template ([CLS] a [SEP] b [SEP] for WordPiece)."""
        return self.tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, pair: str | None = None) -> tuple[list[int], list[tuple[int, int]], list]:
        """(ids, character offsets of each token in its text, which text each token is from:
        0, 1 or None for a special token); what extractive QA needs to map answer spans."""
        enc = self.tokenizer.encode(text, pair)
        return enc.ids, enc.offsets, enc.sequence_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        """tokenizer.json, or a folder with tokenizer.json, vocab.json + merges.txt, or vocab.txt."""
        path = Path(path)
        if path.is_file():
            return cls._from_json(path)
        if (path / "tokenizer.json").exists():
            return cls._from_json(path / "tokenizer.json")
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return cls(_byte_level_bpe(path / "vocab.json", path / "merges.txt"))
        if (path / "vocab.txt").exists():
            config = path / "tokenizer_config.json"
            lower = json.loads(config.read_text()).get("do_lower_case", True) if config.exists() else True
            return cls(_wordpiece(path / "vocab.txt", lowercase=lower))
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        raise FileNotFoundError(f"tokenizer: no tokenizer files in {str(path)!r}; expected tokenizer.json, "
                                f"vocab.json + merges.txt, or vocab.txt; found {present or 'nothing'}")

    @classmethod
    def _from_json(cls, file: Path) -> "HFTokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(str(file)))
        except Exception as error:
            raise ValueError(f"tokenizer: cannot read {str(file)!r} ({type(error).__name__}: {error})") from error


def _byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    """GPT-2's pipeline: bytes mapped to printable characters, regex pre-split, BPE merges."""
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id("<|endoftext|>") is not None:
        tok.add_special_tokens(["<|endoftext|>"])
    return tok


def _wordpiece(vocab: Path, lowercase: bool = True) -> tokenizers.Tokenizer:
    """BERT's pipeline: clean + lowercase, split on whitespace and punctuation, greedy
    longest-match WordPiece with `##` continuations, then [CLS] a [SEP] (b [SEP])."""
    tok = tokenizers.Tokenizer(models.WordPiece(models.WordPiece.read_file(str(vocab)), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if tok.token_to_id(t) is not None]
    tok.add_special_tokens(specials)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise ValueError(f"tokenizer: {str(vocab)!r} has no [CLS]/[SEP] tokens; not a BERT WordPiece vocabulary")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


def train_bpe_tokenizer(source: Iterable, vocab_size: int, min_frequency: int = 2,
                        special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE tokenizer.

    source: an iterable of texts (str), or of files (pathlib.Path / os.PathLike) to read.
    vocab_size counts the 256 byte symbols and the special tokens.
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"train_bpe_tokenizer: vocab_size must be at least {256 + len(special_tokens)} "
                         f"(256 bytes + special tokens), got {vocab_size}")
    items = list(source)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if items and all(isinstance(x, os.PathLike) for x in items):
        missing = [str(x) for x in items if not Path(x).is_file()]
        if missing:
            raise FileNotFoundError(f"train_bpe_tokenizer: files not found: {', '.join(missing)}")
        tok.train([str(x) for x in items], trainer)
    elif all(isinstance(x, str) for x in items):
        tok.train_from_iterator(items, trainer)
    else:
        kinds = sorted({type(x).__name__ for x in items})
        raise TypeError(f"train_bpe_tokenizer: source must hold only texts (str) or only files (pathlib.Path), "
                        f"got items of types {kinds}")
    return HFTokenizer(tok)


# ----------------------------------------------------------------------------- llama2.c

class Llama2cTokenizer:
    """llama2.c `tokenizer.bin`: int32 max_token_length, then per token float32 score,
    int32 length, the piece's bytes. Ids 0 <unk>, 1 BOS, 2 EOS, 3..258 the bytes <0x00>..<0xFF>.

    encode (as run.c): BOS, a dummy-prefix space, each character as its piece if the
    vocabulary has it or else as its UTF-8 byte tokens (byte fallback), then repeatedly
    merge the adjacent pair whose concatenation is the piece with the highest score
    (leftmost on ties) until no adjacent pair forms a piece.
    """

    unk_id, bos_id, eos_id, pad_id, cls_id, sep_id = 0, 1, 2, None, None, None
    BYTE_OFFSET = 3  # id of <0x00>

    def __init__(self, pieces: list[bytes], scores: list[float]):
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        self.ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self.ids.setdefault(piece, i)

    @classmethod
    def from_file(cls, path, vocab_size: int | None = None) -> "Llama2cTokenizer":
        """vocab_size is not stored in the file: read it all, or exactly vocab_size tokens."""
        raw = Path(path).read_bytes()
        pieces, scores, offset = [], [], 4
        try:
            (max_len,) = struct.unpack_from("<i", raw, 0)
            while offset < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
                score, length = struct.unpack_from("<fi", raw, offset)
                if not 0 < length <= max_len or offset + 8 + length > len(raw):
                    raise ValueError(f"token {len(pieces)} has length {length} (max_token_length {max_len})")
                pieces.append(raw[offset + 8: offset + 8 + length])
                scores.append(score)
                offset += 8 + length
        except (struct.error, ValueError) as error:
            raise ValueError(f"tokenizer: {str(path)!r} is not a valid llama2.c tokenizer file: {error}") from error
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ValueError(f"tokenizer: {str(path)!r} holds {len(pieces)} tokens, expected {vocab_size}")
        if len(pieces) < 259:
            raise ValueError(f"tokenizer: {str(path)!r} holds {len(pieces)} tokens, fewer than the 259 "
                             "(<unk>, BOS, EOS, 256 bytes) every llama2.c vocabulary starts with")
        return cls(pieces, scores)

    def _initial(self, text: str) -> list[int]:
        ids = []
        for ch in text:
            piece = ch.encode("utf-8")
            if piece in self.ids:
                ids.append(self.ids[piece])
            else:
                ids.extend(b + self.BYTE_OFFSET for b in piece)  # byte fallback
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """run.c's greedy loop, with a heap instead of a full scan per merge.

        Tokens live in a linked list indexed by their first position; a heap entry
        (-score, left position, left id, right id) is stale once either side changed.
        Smallest left position = leftmost pair, so ties resolve exactly as in run.c.
        """
        n = len(ids)
        tokens, nxt, prv = list(ids), list(range(1, n + 1)), list(range(-1, n - 1))
        heap = []

        def push(i):
            j = nxt[i]
            if j < n:
                merged = self.ids.get(self.pieces[tokens[i]] + self.pieces[tokens[j]])
                if merged is not None:
                    heapq.heappush(heap, (-self.scores[merged], i, tokens[i], tokens[j], merged))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            if tokens[i] != left or j >= n or tokens[j] != right:
                continue  # stale: one side was merged away since this entry was pushed
            tokens[i], tokens[j] = merged, None
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [t for t in tokens if t is not None]

    def encode(self, text: str, pair: str | None = None, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of text; a pair is appended as a second encoded text without its BOS."""
        ids = [self.bos_id] if bos else []
        if text:
            ids += self._merge([self.ids[b" "]] + self._initial(text))  # dummy prefix, as SentencePiece
        if pair is not None:
            ids += self.encode(pair, bos=False)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenate the pieces; the leading space of the first piece of a text (at the start or
        right after BOS) is dropped, byte tokens become their byte, BOS/EOS are skipped."""
        out, previous = bytearray(), None
        for i in ids:
            i = int(i)
            if i in (self.bos_id, self.eos_id):
                previous = i
                continue
            piece = self.pieces[i]
            if self.BYTE_OFFSET <= i < self.BYTE_OFFSET + 256:
                piece = bytes([i - self.BYTE_OFFSET])
            elif previous in (None, self.bos_id) and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
            previous = i
        return out.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- loading

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt"]


def load_tokenizer(source) -> Tokenizer:
    """A llama2.c .bin file, a tokenizer.json file, a folder of tokenizer files, or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".bin":
            return Llama2cTokenizer.from_file(path)
        return HFTokenizer.from_file(path)
    if not path.exists():
        from trainers.checkpoint_files import resolve_source  # hub ids, when online
        path = resolve_source(source, allow_patterns=TOKENIZER_FILES)
    return HFTokenizer.from_file(path)
