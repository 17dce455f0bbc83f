"""Tokenizer: OpenAI-identical ids (checked against OpenCLIP's pure-Python copy), training, save/load, hashing."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import ftfy
import pytest
import regex
import torch

import clip_core.tokenizer as tokenizer_module
from clip_core.tokenizer import Tokenizer, clean_text

# open_clip's __init__ needs torchvision; find the package dir without running it.
OPEN_CLIP_DIR = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
OPENAI_BPE = OPEN_CLIP_DIR / "bpe_simple_vocab_16e6.txt.gz"
REPO = Path(__file__).resolve().parent.parent

# Hand-picked captions: punctuation, case, contractions, numbers, HTML entities, unicode, emoji, mojibake,
# odd whitespace and control chars, and captions far longer than 77 tokens.
CORPUS = [
    "", " ", "\t\n", "a photo of a cat", "A PHOTO OF A DOG.", "Hello, World!!! ...", "it's a dog's life; they'll go",
    "I'M HERE, YOU'RE THERE, WE'VE BEEN, HE'D GO", "''s 's' ' s", "Price: $19.99 (was $25) -- 50% off!!",
    "1234567890 3.14159 1,000,000 2019-12-31 12:30pm #42 @user", "e-mail: foo.bar@example.com http://x.y/z?q=1&r=2",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;single&#39; &amp;amp;lt;double&amp;amp;gt; &nbsp;nbsp &copy;",
    "<b>bold</b> & <i>italic</i> &amp; more", "café naïve résumé über straße Ærøskøbing", "東京タワーの夜景 北京 서울",
    "Привет мир! Γειά σου Κόσμε ΟΔΟΣ", "مرحبا بالعالم", "नमस्ते दुनिया", "🐱🐶 emoji 👍🏽 family 👨‍👩‍👧 flags 🇺🇸🇫🇷",
    "â€™ mojibake Ã© cafÃ©", "curly “quotes” and ‘apostrophes’ — dashes – …", "ﬁne ﬂour ligatures", "ＦＵＬＬ　ｗｉｄｔｈ",
    "İstanbul ſtraße K Kelvin", "aͅbͅͅ 'ͅx ͅ", "tabs\tand\nnewlines\r\nand  many   spaces", "\x00null\x1b[31mred\x1b[0m",
    "non\u00a0breaking\u2009thin\u3000ideographic", "zero\u200bwidth\u200djoiner", "word " * 120,
    "supercalifragilisticexpialidocious " * 30, "a-b_c/d\\e|f~g^h`i{j}k[l]m<n>o", "!!!???...,,,;;;:::",
    "🙂" * 100,
]
# Literal special-token strings, where OpenCLIP's copy (which renamed them) and OpenAI's original differ.
SPECIALS = ["<start_of_text> and <end_of_text> are plain text for OpenAI", "<|endoftext|>", "a<|endoftext|>b", "!!<|endoftext|>", "<|startoftext|> hi <|endoftext|> there",
            "x <|STARTOFTEXT|>", "<|endoftext|>" * 50]


def random_corpus(n: int, seed: int) -> list[str]:
    """Captions stitched from pieces that stress normalisation and pre-tokenisation."""
    rng = random.Random(seed)
    pieces = ["photo", "Dog", "CAT", "the", "of", "'s", "'LL", "'re", "don't", ",", ".", "!!", "?", "-", "&", "&amp;",
              "&lt;", "&#233;", "&amp;amp;", "<", ">", "/", "\\", "0", "42", "3.5", "1999", "é", "Ü", "ß", "ñ", "ø",
              "日本", "中文", "한국", "ж", "Σ", "ς", "ͅ", "\u0301", "ſ", "İ", "K", "ﬁ", "Ａ", "’", "“", "—", "…", "😀",
              "👍🏽", "🇯🇵", "\u200b", "\u00a0", "\t", "\n", "\r\n", "\x1b", "\x07", "  ", " ", " ", " ", " ", "Ã©", "â€"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def random_ascii(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r", "\x0b", "\x0c", "\x1b", "\x00", "&amp;", "&lt;",
                                                    "&#39;", "&gt;", "'s", "'ll", "   "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def captions(n: int, seed: int) -> list[str]:
    """A small caption-like training corpus."""
    rng = random.Random(seed)
    nouns = ["cat", "dog", "house", "tree", "car", "beach", "mountain", "river", "city", "flower", "bird", "pizza",
             "bicycle", "window", "kitchen", "garden", "bridge", "horse", "table", "guitar", "train", "forest"]
    adjs = ["red", "big", "small", "happy", "old", "sunny", "wooden", "tiny", "bright", "quiet", "yellow", "frozen",
            "crowded", "empty", "vintage", "colorful", "sleepy", "golden"]
    verbs = ["sitting on", "next to", "running through", "under", "near", "above"]
    return [f"A {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(adjs)} "
            f"{rng.choice(nouns)}, photo {rng.randint(0, 99)} — café" for _ in range(n)]


@pytest.fixture(scope="module")
def openclip() -> ModuleType:
    """OpenCLIP's tokenizer module (a copy of OpenAI's), loaded by path; it sets TOKENIZERS_PARALLELISM, undone here."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    spec = importlib.util.spec_from_file_location("openclip_tokenizer_reference", OPEN_CLIP_DIR / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if before is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return module


@pytest.fixture(scope="module")
def openai_reference(openclip):
    """OpenCLIP's SimpleTokenizer with OpenAI's original special-token names and regex restored."""
    ref = openclip.SimpleTokenizer(str(OPENAI_BPE))
    sot, eot = "<|startoftext|>", "<|endoftext|>"
    del ref.encoder["<start_of_text>"], ref.encoder["<end_of_text>"]
    ref.encoder.update({sot: 49406, eot: 49407})
    ref.decoder = {v: k for k, v in ref.encoder.items()}
    ref.cache = {sot: sot, eot: eot}
    ref.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    return ref


@pytest.fixture(scope="module")
def openai_tok() -> Tokenizer:
    return Tokenizer.from_openai_bpe(OPENAI_BPE)


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(captions(2000, seed=0), vocab_size=640, context_length=32)


def test_openai_layout(openai_tok):
    assert (openai_tok.vocab_size, openai_tok.sot_token_id, openai_tok.eot_token_id) == (49408, 49406, 49407)
    assert openai_tok.context_length == 77 and openai_tok.id.startswith("bpe-") and len(openai_tok.id) == 16


def test_ids_identical_to_openclip(openai_tok, openclip):
    texts = CORPUS + random_corpus(1500, seed=1) + random_ascii(1500, seed=2)
    texts = [t for t in texts if "<|" not in t.lower()]  # OpenCLIP renamed the special tokens; see next test
    ours = openai_tok(texts)
    ref = openclip.tokenize(texts)
    mismatched = [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    for text in CORPUS:
        assert openai_tok.encode(text) == openclip._tokenizer.encode(text), text


def test_ids_identical_once_the_word_cache_is_full(openclip, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CACHE_WORDS", 50)
    tok = Tokenizer.from_openai_bpe(OPENAI_BPE)
    texts = CORPUS[:20] + random_corpus(100, seed=5)
    assert torch.equal(tok(texts[:5]), openclip.tokenize(texts[:5]))  # fills part of the cache
    assert torch.equal(tok(texts), openclip.tokenize(texts))  # overflows it
    assert len(tok._cache) <= 50


def test_ids_identical_to_openai_with_literal_special_tokens(openai_tok, openai_reference):
    texts = SPECIALS + CORPUS[:10] + random_corpus(200, seed=3)
    assert [openai_tok.encode(t) for t in texts] == [openai_reference.encode(t) for t in texts]
    assert openai_tok.encode("<|endoftext|>") == [openai_tok.eot_token_id]
    assert openai_tok.eot_token_id not in openai_tok.encode("!!<|endoftext|>")  # regex scans "!!<|" as one word


def test_truncation_keeps_eot_and_pads_with_zeros(openai_tok, openclip):
    long = "a very long caption about many many things " * 30
    tokens = openai_tok([long, "short"], context_length=16)
    assert tokens.shape == (2, 16)
    assert tokens[0, 0] == openai_tok.sot_token_id and tokens[0, -1] == openai_tok.eot_token_id
    assert (tokens[0] != 0).all()
    assert tokens[1].tolist() == [49406, 3005, 49407] + [0] * 13
    assert torch.equal(tokens, openclip.tokenize([long, "short"], context_length=16))
    assert torch.equal(openai_tok(long)[0, 1:76], torch.tensor(openai_tok.encode(long)[:75]))
    with pytest.raises(ValueError, match="context_length"):
        openai_tok("x", context_length=1)


def test_clean_text_shortcut_matches_ftfy(openclip):
    texts = random_ascii(3000, seed=4) + CORPUS
    full = [" ".join(html.unescape(html.unescape(ftfy.fix_text(t))).split()).lower() for t in texts]
    assert [clean_text(t) for t in texts] == full
    assert [openclip._clean_lower(t) for t in texts] == full


def test_decode(openai_tok, trained):
    assert openai_tok.decode(openai_tok(["Hello, World!"])[0]) == "hello , world !"
    text = "café über 東京 🐱 the naïve crème brûlée"
    assert openai_tok.decode(openai_tok.encode(text)) == text
    assert trained.decode(trained.encode(text)) == text  # bytes unseen in training still round-trip
    assert trained.decode(trained(text, context_length=128)[0]) == text
    with pytest.raises(ValueError, match="ids must be ints"):
        openai_tok.decode([49408])


def test_rejects_non_strings(openai_tok):
    with pytest.raises(TypeError, match="text 1 is NoneType"):
        openai_tok(["ok", None])


def test_train_gives_requested_vocab_with_eot_highest(trained):
    assert trained.vocab_size == 640 and trained.context_length == 32
    assert (trained.sot_token_id, trained.eot_token_id) == (638, 639)
    tokens = trained(captions(50, seed=9) + ["x " * 100])
    assert tokens.shape == (51, 32) and tokens.max() <= 639
    assert torch.equal(tokens.argmax(-1), (tokens == 639).int().argmax(-1))  # EOT is where the model pools
    # Learned merges compress the training domain: words in every caption are one token each.
    assert len(trained.encode("the photo")) == 2
    assert len(trained.encode("a happy dog sitting on the sunny beach")) < 38 / 2


def test_train_is_deterministic_across_processes(trained, openai_tok, tmp_path):
    assert Tokenizer.train(captions(2000, seed=0), vocab_size=640, context_length=32).id == trained.id
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(captions(2000, seed=0)))
    code = ("import json, sys; from clip_core.tokenizer import Tokenizer; "
            f"t = Tokenizer.train(json.load(open({str(corpus)!r})), vocab_size=640, context_length=32); "
            f"o = Tokenizer.from_openai_bpe({str(OPENAI_BPE)!r}); print(t.id, o.id)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         timeout=120)
    assert out.stdout.split() == [trained.id, openai_tok.id]


def test_train_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["a cat"], vocab_size=514)
    with pytest.raises(ValueError, match="corpus supports at most"):
        Tokenizer.train(["a cat", "a dog"], vocab_size=5000)


def test_ids_differ_between_vocabularies(trained, openai_tok):
    other = Tokenizer.train(captions(2000, seed=0), vocab_size=600, context_length=32)
    longer = Tokenizer.train(captions(2000, seed=0), vocab_size=640, context_length=64)
    assert len({trained.id, other.id, longer.id, openai_tok.id}) == 4


@pytest.mark.parametrize("which", ["openai_tok", "trained"])
def test_save_load_roundtrip(which, request, tmp_path):
    tok = request.getfixturevalue(which)
    texts = CORPUS + SPECIALS
    loaded = Tokenizer.load(tok.save(tmp_path / "tok"))
    for other in (loaded, pickle.loads(pickle.dumps(tok))):
        assert (other.id, other.vocab_size, other.context_length, other.source) == \
            (tok.id, tok.vocab_size, tok.context_length, tok.source)
        assert torch.equal(other(texts), tok(texts))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eot_token_id"] == tok.vocab_size - 1 and config["id"] == tok.id


def test_load_errors_name_the_file(trained, tmp_path):
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path / "missing")
    good = trained.save(tmp_path / "good")
    damages = [("merges.txt", lambda p: p.unlink()),
                         ("vocab.json", lambda p: p.write_text("{not json")),
                         ("tokenizer_config.json", lambda p: p.write_text("[]")),
                         # an edited merge list still parses but no longer matches the recorded content hash
                         ("tokenizer_config.json", lambda p: p.parent.joinpath("merges.txt").write_text(
                             "\n".join(p.parent.joinpath("merges.txt").read_text().splitlines()[:-1]) + "\n"))]
    for n, (name, damage) in enumerate(damages):
        bad = tmp_path / f"bad-{n}"
        bad.mkdir()
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        damage(bad / name)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            Tokenizer.load(bad)


def test_from_openai_bpe_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="nope.txt.gz"):
        Tokenizer.from_openai_bpe(tmp_path / "nope.txt.gz")
    short = tmp_path / "short.txt"
    short.write_text("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="short.txt: has 2 merges"):
        Tokenizer.from_openai_bpe(short)
