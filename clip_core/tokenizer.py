"""CLIP's byte-level BPE tokenizer: OpenAI's exact token ids, fast batch encoding, training from scratch.

Why this shape:
- Text is normalised exactly as OpenAI's ``simple_tokenizer.py`` does (ftfy, HTML unescape twice,
  whitespace collapse, lower case), split with the same regex, mapped byte -> printable char, and
  merged with BPE where the last char of each word carries ``</w>``. Loading OpenAI's merges file
  therefore gives OpenAI's ids (49408 tokens, SOT 49406, EOT 49407).
- Words are split by Python's ``regex`` -- the reference engine. The Rust ``tokenizers`` regex engine
  (Oniguruma) disagrees with it on tens of thousands of code points (Unicode versions differ, and
  ``regex`` case-folds combining marks such as U+0345 into letters), so splitting in Rust would break
  exactness. The BPE merges run in Rust (``tokenizers``), one batched call per batch for the words not
  yet seen; a bounded word -> ids cache serves the rest (captions repeat words: Zipf). Measured in
  ``benchmarks/tokenizer_bench.py``.
- Every vocabulary (OpenAI's or trained) is laid out as 256 byte chars, the same 256 with ``</w>``,
  the merge results, then SOT and EOT, so EOT always has the highest id: the text tower pools at
  ``tokens.argmax(-1)``.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
from collections import ChainMap
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
WORD_END = "</w>"
# OpenAI's pre-tokenisation pattern (compiled with IGNORECASE, as OpenAI does).
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
OPENAI_NUM_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77
FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
MERGES_HEADER = "#version: 0.2"
CACHE_WORDS = 1 << 17  # word -> ids entries kept per tokenizer (tens of MB); beyond it new words skip the cache

_SPLIT = regex.compile(PATTERN, regex.IGNORECASE)
# Text made only of printable ASCII and \t \n \r, without '&', is returned unchanged by ftfy.fix_text
# and html.unescape; skipping them for it makes normalisation ~3x faster (tested against ftfy).
_NEEDS_FIXING = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2's byte -> printable char table (so BPE never sees whitespace or control chars)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def base_symbols() -> list[str]:
    """The 512 symbols every vocabulary starts with: each byte char, then each byte char + ``</w>``."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + WORD_END for c in chars]


def clean_text(text: str) -> str:
    """OpenAI's normalisation: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    if _NEEDS_FIXING.search(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> list[str]:
    """The CLIP vocabulary layout for ``merges``: base symbols, merge results in order, SOT, EOT."""
    vocab = base_symbols()
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    return vocab + [SOT, EOT]


class Tokenizer:
    """Byte-level BPE tokenizer with CLIP's conventions; see the module docstring."""

    def __init__(self, vocab: Sequence[str], merges: Sequence[tuple[str, str]],
                 context_length: int = DEFAULT_CONTEXT_LENGTH, source: str = "custom") -> None:
        self._vocab = list(vocab)
        self._merges = [(str(a), str(b)) for a, b in merges]
        self._context_length = _check_context_length(context_length)
        self.source = source
        self._token_to_id = {t: i for i, t in enumerate(self._vocab)}
        _check_vocab(self._vocab, self._token_to_id, self._merges)
        self.id = _content_id(self._vocab, self._merges, self._context_length)
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        # Byte map + BPE over words already split in Python (each word ends with </w>).
        self._bpe = _RustTokenizer(models.BPE(vocab=self._token_to_id, merges=self._merges, end_of_word_suffix=WORD_END))
        self._bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # A literal special-token word maps to its id, as in OpenAI's tokenizer.
        self._cache: dict[str, list[int]] = {SOT: [self.sot_token_id], EOT: [self.eot_token_id]}

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_openai_bpe(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
        """Load OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (gzip or plain: a header line, then merges, of which
        the first 48894 are used, as OpenAI does)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the OpenAI BPE merges file ({e}); pass the path of "
                             "bpe_simple_vocab_16e6.txt.gz") from e
        merges = _parse_merges(text.split("\n")[1:], path, limit=OPENAI_NUM_MERGES)
        if len(merges) < OPENAI_NUM_MERGES:
            raise ValueError(f"{path}: has {len(merges)} merges, OpenAI's vocabulary needs {OPENAI_NUM_MERGES}; "
                             "the file is truncated or not bpe_simple_vocab_16e6.txt.gz")
        return cls(vocab_from_merges(merges), merges, context_length, source="openai")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, context_length: int = DEFAULT_CONTEXT_LENGTH,
              *, show_progress: bool = False) -> "Tokenizer":
        """Learn a byte-level BPE vocabulary of exactly ``vocab_size`` tokens on ``texts`` (deterministic)."""
        _check_context_length(context_length)
        smallest = len(base_symbols()) + 2 + 1
        if vocab_size < smallest:
            raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level CLIP vocabulary needs at least "
                             f"{smallest} tokens (512 byte symbols, SOT, EOT and one merge)")
        learner = _RustTokenizer(models.BPE(end_of_word_suffix=WORD_END))
        learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # The learner's own alphabet holds at most the 512 base symbols, so asking it for vocab_size - 2
        # tokens yields at least the vocab_size - 514 merges we keep (fewer only when the corpus runs out).
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      end_of_word_suffix=WORD_END, show_progress=show_progress)
        learner.train_from_iterator(_training_words(texts), trainer=trainer)
        learned = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
        vocab, merges = base_symbols(), []
        known = set(vocab)
        for a, b in learned:
            if len(vocab) == vocab_size - 2:
                break
            merges.append((a, b))
            if a + b not in known:
                known.add(a + b)
                vocab.append(a + b)
        if len(vocab) < vocab_size - 2:
            raise ValueError(f"the corpus supports at most {len(vocab) + 2} tokens, vocab_size={vocab_size} was "
                             "requested: train on more text or ask for a smaller vocabulary")
        return cls(vocab + [SOT, EOT], merges, context_length, source="trained")

    # ---- properties ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def sot_token_id(self) -> int:
        return len(self._vocab) - 2

    @property
    def eot_token_id(self) -> int:
        return len(self._vocab) - 1

    @property
    def context_length(self) -> int:
        return self._context_length

    def __repr__(self) -> str:
        return (f"Tokenizer(id={self.id!r}, source={self.source!r}, vocab_size={self.vocab_size}, "
                f"context_length={self.context_length})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Ship the definition, not the Rust objects: workers rebuild them (a few MB smaller, same ids).
        return (type(self), (self._vocab, self._merges, self._context_length, self.source))

    # ---- encoding -----------------------------------------------------------------------------------

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without SOT/EOT and without truncation."""
        split = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
            split.append(_SPLIT.findall(clean_text(text)))
        cache = self._cache
        table: Mapping[str, list[int]] = cache
        new = self._bpe_words(list({w for words in split for w in words if w not in cache}))
        if len(cache) + len(new) <= CACHE_WORDS:
            cache.update(new)
        else:
            table = ChainMap(new, cache)
        out = []
        for words in split:
            ids: list[int] = []
            for w in words:
                ids += table[w]
            out.append(ids)
        return out

    def _bpe_words(self, words: list[str]) -> dict[str, list[int]]:
        """BPE ids of each word, in one Rust call (one sequence of words: ~4x cheaper than one per word)."""
        if not words:
            return {}
        enc = self._bpe.encode(words, is_pretokenized=True, add_special_tokens=False)
        out: dict[str, list[int]] = {w: [] for w in words}
        for word_index, token_id in zip(enc.word_ids, enc.ids):
            out[words[word_index]].append(token_id)
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT (a literal "<|endoftext|>" word maps to EOT, as in OpenAI's)."""
        return self.encode_batch([text])[0]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """SOT + ids + EOT per text, truncated to keep EOT last, zero-padded: LongTensor (N, context_length)."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = self._context_length if context_length is None else _check_context_length(context_length)
        rows = self.encode_batch(texts)
        out = np.zeros((len(rows), ctx), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        for i, ids in enumerate(rows):
            ids = ids[:ctx - 2]
            out[i, 1:len(ids) + 1] = ids
            out[i, len(ids) + 1] = self.eot_token_id
        return torch.from_numpy(out)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``: a leading SOT is dropped and decoding stops at the first EOT (where the model
        pools), so a padded row from ``__call__`` decodes cleanly; ``</w>`` becomes a space."""
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
        if ids and ids[0] == self.sot_token_id:
            ids = ids[1:]
        if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
        if not all(isinstance(i, (int, np.integer)) and 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"cannot decode {ids!r}: ids must be ints in [0, {self.vocab_size})")
        tokens = [self._vocab[i] for i in ids]
        space = bytes_to_unicode()[ord(" ")]
        text = "".join(t[:-len(WORD_END)] + space if t.endswith(WORD_END) else t for t in tokens)
        return bytes(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace").strip()

    # ---- persistence --------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / VOCAB_FILE).write_text(json.dumps(self._token_to_id, ensure_ascii=False), encoding="utf-8")
        (directory / MERGES_FILE).write_text(
            "\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in self._merges]) + "\n", encoding="utf-8")
        config = {"format_version": FORMAT_VERSION, "id": self.id, "source": self.source,
                  "vocab_size": self.vocab_size, "context_length": self._context_length,
                  "sot_token_id": self.sot_token_id, "eot_token_id": self.eot_token_id}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Restore a tokenizer written by :meth:`save`; missing or corrupt files raise ValueError naming the file."""
        directory = Path(directory)
        config_path, vocab_path, merges_path = (directory / n for n in (CONFIG_FILE, VOCAB_FILE, MERGES_FILE))
        config = _read_json(config_path)
        if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: not a tokenizer config of format version {FORMAT_VERSION}")
        token_to_id = _read_json(vocab_path)
        if (not isinstance(token_to_id, dict) or sorted(token_to_id.values()) != list(range(len(token_to_id)))):
            raise ValueError(f"{vocab_path}: must map each token to a distinct id 0..N-1")
        vocab = sorted(token_to_id, key=token_to_id.__getitem__)
        lines = _read_text(merges_path).split("\n")
        if lines[0] != MERGES_HEADER:
            raise ValueError(f"{merges_path}: first line must be {MERGES_HEADER!r}")
        merges = _parse_merges(lines[1:], merges_path)
        try:
            tok = cls(vocab, merges, config["context_length"], source=str(config.get("source", "custom")))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory}: inconsistent tokenizer files ({e}); re-save the tokenizer") from e
        if tok.id != config.get("id"):
            raise ValueError(f"{config_path}: records id {config.get('id')!r} but {VOCAB_FILE}/{MERGES_FILE} hash "
                             f"to {tok.id!r}; the files are corrupt or were edited separately")
        return tok


def _check_context_length(context_length: int) -> int:
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
    return context_length


def _check_vocab(vocab: list[str], token_to_id: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Reject vocabularies that would silently mis-tokenise (missing bytes, dangling merges, misplaced specials)."""
    if len(token_to_id) != len(vocab):
        raise ValueError("vocabulary has duplicate tokens")
    if vocab[-2:] != [SOT, EOT]:
        raise ValueError(f"the last two tokens must be {SOT} and {EOT} (EOT has the highest id)")
    missing = [s for s in base_symbols() if s not in token_to_id]
    if missing:
        raise ValueError(f"vocabulary lacks {len(missing)} of the 512 byte symbols, e.g. {missing[0]!r}")
    for a, b in merges:
        if a not in token_to_id or b not in token_to_id or a + b not in token_to_id:
            raise ValueError(f"merge {a!r} {b!r} uses or makes a token not in the vocabulary")


def _content_id(vocab: list[str], merges: list[tuple[str, str]], context_length: int) -> str:
    payload = json.dumps({"vocab": vocab, "merges": merges, "context_length": context_length}, ensure_ascii=False)
    return "bpe-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def _parse_merges(lines: Iterable[str], path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """Merges from the lines after a file's header line (blank lines skipped), at most ``limit``."""
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines, start=2):
        if len(merges) == limit:
            break
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{path}: line {n} is {line!r}, expected two space-separated symbols")
        merges.append((parts[0], parts[1]))
    return merges


def _training_words(texts: Iterable[str]) -> Iterator[list[str]]:
    """Each text as its list of words, split exactly as at encode time (special-token words left out)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text {i} is {type(text).__name__}, expected str")
        yield [w for w in _SPLIT.findall(clean_text(text)) if w not in (SOT, EOT)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer file ({e}); point to a directory written by "
                         "Tokenizer.save()") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt JSON ({e}); re-save the tokenizer") from e
