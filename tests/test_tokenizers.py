"""Tokenizers: CLIP BPE ids identical to open_clip's, sentencepiece train/load, bad input."""

import pickle
import random

import numpy as np
import pytest

from clipjax import config as config_lib
from clipjax.data import tokenizers
from clipjax.errors import ClipjaxError, ConfigError
from clipjax.interop import peer

WORDS = (
    "a photo of the cat dog sitting on red blue car street night people two three "
    "beautiful mountain lake sunset portrait close-up vintage poster illustration don't "
    "it's we're they've I'm you'll he'd COVID-19 iPhone 4K HDR T-shirt 3D e-mail").split()
FRAGMENTS = [
    # accents, scripts, CJK, RTL
    "café", "naïve", "Ångström", "façade", "São Paulo", "Straße", "Øresund", "İstanbul",
    "東京タワー", "北京烤鸭", "한국어 문장", "Привет мир", "Ελληνικά", "مرحبا بالعالم",
    "שלום", "हिन्दी", "ภาษาไทย", "Tiếng Việt",
    # emoji: plain, skin tones, ZWJ families, flags, keycaps
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵🇫🇷", "1️⃣", "❤️‍🔥", "🐱🐶",
    # HTML entities, double escaped, tags
    "&amp;", "&amp;amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;", "&#x2019;", "&nbsp;", "&hellip;",
    "<b>tag</b>", "<br/>", "&copy; 2020", "&Eacute;", "&notanentity;", "AT&T",
    # mojibake, ligatures, width, curly quotes
    "sÃ³", "â€œquotedâ€\x9d", "ﬂubberiﬁc", "ＬＯＵＤ　ＮＯＩＳＥＳ", "“curly” ‘quotes’", "—–-",
    # whitespace and control characters
    "  ", "\t", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x1c", "\x00",
    "\u200b", "\ufeff", "\x1b[31mred\x1b[0m",
    # punctuation, numbers, contractions, special-token lookalikes
    "!!!", "...", "?!?", "(parenthesised)", "[brackets]", "{braces}", "#hashtag", "@user",
    "3.14159", "1,000,000", "2024-01-01", "12:30pm", "$99.99", "50%", "'S", "'LL", "'Re",
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<|endoftext|>", "</w>",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF),
                         rng.randint(0x3000, 0xD7FF), rng.randint(0xE000, 0xFFFD),
                         rng.randint(0x1F300, 0x1FAFF), rng.randint(0x10000, 0x10FFFF)])
        out.append(chr(cp))
    return "".join(out)


def varied_strings(count: int = 2400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "a", "A photo of a cat.", " ".join(WORDS), *FRAGMENTS]
    while len(texts) < count:
        kind = rng.randrange(6)
        if kind == 0:  # caption-like ASCII
            texts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))))
        elif kind == 1:  # captions mixed with fragments
            parts = [rng.choice(WORDS + FRAGMENTS) for _ in range(rng.randint(1, 12))]
            texts.append(rng.choice([" ", "", "  ", "\t"]).join(parts))
        elif kind == 2:  # random code points, including astral planes
            texts.append(_random_unicode(rng, rng.randint(1, 30)))
        elif kind == 3:  # long texts: well over 77 tokens
            n = rng.randint(60, 200)
            texts.append(" ".join(rng.choice(WORDS + FRAGMENTS) for _ in range(n)))
        elif kind == 4:  # whitespace runs and case
            words = [rng.choice(WORDS).upper() if rng.random() < 0.3 else rng.choice(WORDS)
                     for _ in range(rng.randint(1, 8))]
            gaps = [" ", "   ", "\n", "\t \t", "\u00a0"]
            texts.append("".join(w + rng.choice(gaps) for w in words))
        else:  # punctuation and digits soup
            soup = "0123456789.,;:!?-_'\"()[]&#%$@ "
            texts.append("".join(rng.choice(soup) for _ in range(rng.randint(1, 40))))
    return texts


@pytest.fixture(scope="module")
def open_clip():
    return peer.open_clip()


@pytest.fixture(scope="module")
def bpe():
    return tokenizers.ClipBpeTokenizer()


def test_clip_bpe_ids_identical_to_open_clip(open_clip, bpe):
    texts = varied_strings()
    assert len(texts) >= 2000
    ours = bpe(texts)
    reference = open_clip.tokenize(texts).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    mismatched = [t for t, a, b in zip(texts, ours, reference) if not np.array_equal(a, b)]
    assert not mismatched, f"{len(mismatched)} strings differ, e.g. {mismatched[:3]!r}"
    # The test set reaches the truncation path and the non-ASCII (ftfy) path.
    assert (ours[:, -1] == bpe.eot_id).sum() > 100
    assert sum(not t.isascii() for t in texts) > 500


def test_clip_bpe_matches_get_tokenizer_and_short_context(open_clip, bpe):
    texts = varied_strings(300, seed=1)
    reference = open_clip.get_tokenizer("ViT-B-32")
    np.testing.assert_array_equal(bpe(texts), reference(texts).numpy())
    np.testing.assert_array_equal(bpe(texts, context_length=8), reference(texts, 8).numpy())
    assert bpe.vocab_size == len(reference.encoder) == 49408
    assert (bpe.sot_id, bpe.eot_id) == (reference.sot_token_id, reference.eot_token_id)


def test_ascii_pretokenizer_equals_the_unicode_one(bpe):
    """The stdlib fast path for ASCII text splits exactly as OpenAI's `regex` pattern."""
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + ["'s", "'ll", "'re", "<start_of_text>", "'"]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))).lower()
        assert tokenizers._PRETOKEN_ASCII.findall(text) == bpe._pattern.findall(text), text


def test_clip_bpe_layout_and_decode(bpe):
    ids = bpe(["a photo of a cat", "word " * 100])
    row = ids[0]
    assert row[0] == bpe.sot_id and row[6] == bpe.eot_id and not row[7:].any()
    assert ids[1, -1] == bpe.eot_id and ids[1, 0] == bpe.sot_id  # truncated, end kept
    assert bpe.decode(row) == "a photo of a cat"
    assert bpe.decode(bpe(["Café 東京 😀"])[0]) == "café 東京 😀"


def test_clip_bpe_pickles_with_a_fresh_cache(bpe):
    clone = pickle.loads(pickle.dumps(bpe))
    np.testing.assert_array_equal(clone(["a pickled tokenizer"]), bpe(["a pickled tokenizer"]))


def test_missing_vocab_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope" / tokenizers.VOCAB_FILE)
    with pytest.raises(ClipjaxError, match="does not exist.*model.tokenizer.path"):
        tokenizers.ClipBpeTokenizer(missing)
    cfg = config_lib.default_config().model
    cfg.tokenizer.path = missing
    with pytest.raises(ClipjaxError, match="nope"):
        tokenizers.build_tokenizer(cfg)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ClipjaxError, match="cannot read the CLIP BPE vocab"):
        tokenizers.ClipBpeTokenizer(str(bad))


def test_default_vocab_found_without_importing_torch(repo_root):
    import subprocess
    import sys

    code = ("import sys; from clipjax.data import tokenizers as t; p = t.default_bpe_path(); "
            "assert p.endswith('clipjax/data/vocab/bpe_simple_vocab_16e6.txt.gz'), p; "
            "t.ClipBpeTokenizer()(['x']); "
            "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)


def test_build_tokenizer_checks_the_text_tower(bpe):
    cfg = config_lib.default_config().model
    cfg.text.context_length = 32
    tok = tokenizers.build_tokenizer(cfg)
    assert tok.context_length == 32 and tok(["hi"]).shape == (1, 32)
    cfg.text.vocab_size = 1000
    with pytest.raises(ConfigError, match="model.text.vocab_size"):
        tokenizers.build_tokenizer(cfg)
    cfg.text.vocab_size = 49408
    cfg.text.pool = "last"  # pads with the end token so the last position holds it
    row = tokenizers.build_tokenizer(cfg)(["a cat"])[0]
    assert (row[3:] == bpe.eot_id).all() and row[0] == bpe.sot_id


CAPTIONS = [f"a {c} {a} {o} {p}" for c in ("red", "blue", "green", "small", "large", "yellow")
            for a in ("cat", "dog", "car", "bird", "house", "tree", "horse", "bicycle")
            for o in ("sitting on", "next to", "under", "behind")
            for p in ("the table", "a street", "the beach", "a mountain at night")]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("sp") / "captions"
    return tokenizers.train_sentencepiece(CAPTIONS, str(prefix), vocab_size=40)


def test_sentencepiece_train_and_load_round_trip(sp_model, tmp_path):
    cfg = config_lib.default_config().model
    cfg.tokenizer.kind = "sentencepiece"
    cfg.tokenizer.path = sp_model
    cfg.text.context_length = 32
    tok = tokenizers.build_tokenizer(cfg)
    assert tok.vocab_size == 40 and tok.eot_id == 39  # highest id: argmax pooling finds it
    ids = tok(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), 32) and ids.dtype == np.int32
    for text, row in zip(CAPTIONS[:20], ids):
        assert tok.decode(row) == text  # trained on it: nothing unknown, nothing lost
        n = int(np.argmax(row == tok.eot_id))
        assert row[n] == tok.eot_id and not row[n + 1:].any()
    long = tok(["a red cat " * 20])[0]
    assert long[-1] == tok.eot_id and long.max() == tok.eot_id  # sticky end token
    # Training from a file gives the same model as from an iterator.
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    from_file = tokenizers.train_sentencepiece(str(path), str(tmp_path / "f"), vocab_size=40)
    cfg.tokenizer.path = from_file
    np.testing.assert_array_equal(tokenizers.build_tokenizer(cfg)(CAPTIONS), ids)
    clone = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(clone(CAPTIONS[:5]), ids[:5])


def test_sentencepiece_bad_input(sp_model, tmp_path):
    cfg = config_lib.default_config().model
    cfg.tokenizer.kind = "sentencepiece"
    with pytest.raises(ClipjaxError, match="needs a .model file"):
        tokenizers.build_tokenizer(cfg)
    cfg.tokenizer.path = str(tmp_path / "missing.model")
    with pytest.raises(ClipjaxError, match="missing.model"):
        tokenizers.build_tokenizer(cfg)
    with pytest.raises(ClipjaxError, match="vocab_size 5000 is more pieces"):
        tokenizers.train_sentencepiece(CAPTIONS[:5], str(tmp_path / "x"), vocab_size=5000)


def test_tokenizer_cli(sp_model, tmp_path, capsys, repo_root):
    from clipjax import cli

    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS), encoding="utf-8")
    prefix = tmp_path / "cli"
    assert cli.main(["tokenizer", "train", "--input", str(path), "--out", str(prefix),
                     "--vocab-size", "40"]) == 0
    assert (tmp_path / "cli.model").exists() and (tmp_path / "cli.vocab").exists()
    capsys.readouterr()
    assert cli.main(["tokenizer", "encode", "a photo of a cat"]) == 0
    assert capsys.readouterr().out.split() == ["49406", "320", "1125", "539", "320", "2368",
                                               "49407"]
    assert cli.main(["tokenizer", "encode", "--config", str(repo_root / "configs" / "tiny.py"),
                     "--config.model.tokenizer.kind=sentencepiece",
                     f"--config.model.tokenizer.path={prefix}.model", "a red cat"]) == 0
    assert capsys.readouterr().out.split()[-1] == "39"
    missing = str(tmp_path / "gone" / tokenizers.VOCAB_FILE)
    assert cli.main(["tokenizer", "encode", "--config", str(repo_root / "configs" / "tiny.py"),
                     f"--config.model.tokenizer.path={missing}", "a cat"]) == 1
    assert missing in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", "--input", str(tmp_path / "none.txt"),
                     "--out", str(prefix), "--vocab-size", "40"]) == 1
    assert "none.txt" in capsys.readouterr().err
