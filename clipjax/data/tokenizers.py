"""Text tokenizers: OpenAI's CLIP byte-level BPE and SentencePiece.

Both turn a string or a list of strings into `int32 [N, context_length]`, the
layout every CLIP text tower reads: the text's ids, an end token, then padding.

* `clip_bpe` gives the same ids as open_clip's `SimpleTokenizer` (OpenAI's
  tokenizer) for any string: ftfy + HTML unescaping, whitespace collapsing,
  lower-casing, OpenAI's pre-tokenisation regex, byte-level BPE over the
  48,894 merges of `bpe_simple_vocab_16e6.txt.gz`, `<start_of_text>` ...
  `<end_of_text>`, truncation that keeps the end token, zero padding.
* `sentencepiece` loads a `.model` file (e.g. one made by `train_sentencepiece`)
  and follows big_vision's SigLIP convention: no start token, an end token that
  survives truncation ("sticky" EOS), padding after it.

When the text tower pools the last position (`model.text.pool = "last"`), both
pad with the end token instead of 0, as big_vision's SigLIP does, so that the
last position always holds the end token.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import io
import itertools
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError, ConfigError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # OpenAI's vocabulary: 512 byte symbols + merges + 2 specials
SOT, EOT = "<start_of_text>", "<end_of_text>"
# OpenAI's pre-tokenisation: contractions, letter runs, single digits, other runs.
_PRETOKEN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Text made only of these characters is left unchanged by ftfy.fix_text and by
# html.unescape (no '&', no control characters but whitespace, nothing non-ASCII),
# so the common plain-ASCII caption skips ftfy's cost.
_FTFY_NOOP = re.compile(r"[\t\n\x0c\r\x20-\x25\x27-\x7e]*")
# The same pre-tokenisation for lower-case ASCII text, in the stdlib engine (~2x
# faster than `regex` with Unicode classes): there \p{L} is [a-z] and \p{N} is [0-9].
_PRETOKEN_ASCII = re.compile(
    rf"{SOT}|{EOT}|'(?:s|t|re|ve|m|ll|d)|[a-z]+|[0-9]|[^\sa-z0-9]+", re.ASCII)


def default_bpe_path() -> str:
    """The vocab that ships inside the clipjax package (clipjax/data/vocab/, see NOTICE.txt).

    Read with importlib.resources: no open-clip-torch (nor torch) is needed or imported.
    """
    res = importlib.resources.files("clipjax.data.vocab") / VOCAB_FILE
    if not res.is_file():
        raise ClipjaxError(
            f"this clipjax install lacks clipjax/data/vocab/{VOCAB_FILE} (a broken wheel?); "
            "reinstall clipjax, or point --config.model.tokenizer.path at a copy of it")
    return os.fspath(res)


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible map from bytes to printable characters (whitespace-free).

    Its order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@functools.cache
def _load_merges(path: str) -> tuple[tuple[str, str], ...]:
    try:
        lines = gzip.decompress(paths.read_bytes(path)).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise ClipjaxError(f"cannot read the CLIP BPE vocab {path!r}: {e}") from e
    merges = tuple(tuple(line.split()) for line in lines[1:NUM_MERGES + 1])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ClipjaxError(
            f"{path!r} is not OpenAI's CLIP BPE vocab: expected {NUM_MERGES} merge lines")
    return merges


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, whitespace runs, lower case."""
    if _FTFY_NOOP.fullmatch(text) is None:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipBpeTokenizer:
    """OpenAI CLIP's tokenizer; ids identical to open_clip's `SimpleTokenizer`."""

    def __init__(self, path: str = "", context_length: int = 77, pad_id: int = 0,
                 cache_size: int = 1 << 20):
        import regex

        self.path = _resolve_bpe_path(path)
        merges = _load_merges(self.path)
        symbols = list(_bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self._pattern = regex.compile(f"{SOT}|{EOT}|{_PRETOKEN}", regex.IGNORECASE)
        byte_map = _bytes_to_unicode()
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_map.items()})
        self._byte_decoder = {c: b for b, c in byte_map.items()}
        self._cache_size = cache_size
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._bpe_ids)

    # The lru_cache'd bound method cannot be pickled (grain workers pickle the
    # tokenizer); drop it and build a fresh cache on the other side.
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_word_ids"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._word_ids = functools.lru_cache(maxsize=self._cache_size)(self._bpe_ids)

    def _bpe_ids(self, pretoken: str) -> tuple[int, ...]:
        """BPE of one pre-token: always merge the lowest-ranked adjacent pair."""
        if pretoken in (SOT, EOT):
            return (self.encoder[pretoken],)
        chars = pretoken.encode("utf-8").decode("latin-1").translate(self._byte_table)
        word = [*chars[:-1], chars[-1] + "</w>"]
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = None, NUM_MERGES
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair, NUM_MERGES)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(self.encoder[piece] for piece in word)

    def encode(self, text: str) -> list[int]:
        """The text's ids, without start/end tokens or padding."""
        text = _clean(text)
        pattern = _PRETOKEN_ASCII if text.isascii() else self._pattern
        return list(itertools.chain.from_iterable(map(self._word_ids, pattern.findall(text))))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens kept, padding and ids past the end token dropped)."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                pieces.append(EOT)
                break
            if 0 <= i < self.vocab_size and i != self.sot_id:
                pieces.append(self.decoder[i])
        text = "".join(pieces)
        data = bytes(self._byte_decoder.get(c, ord("?")) for c in text.replace(EOT, ""))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> np.ndarray:
        return _pack([[self.sot_id, *self.encode(t), self.eot_id] for t in _as_list(texts)],
                     context_length or self.context_length, self.eot_id, self.pad_id)


class SentencePieceTokenizer:
    """A SentencePiece model: pieces + sticky end token + padding (big_vision's convention)."""

    def __init__(self, path: str, context_length: int = 77, pad_id: int | None = None):
        import sentencepiece as spm

        if not path:
            raise ClipjaxError(
                "the sentencepiece tokenizer needs a .model file: set "
                "--config.model.tokenizer.path=FILE.model (train one with "
                "`clipjax tokenizer train`)")
        resolved = paths.to_str(path)
        if not _exists(resolved):
            raise ClipjaxError(
                f"sentencepiece model {path!r} does not exist; set "
                "--config.model.tokenizer.path to a .model file")
        self.path = resolved
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=paths.read_bytes(resolved))
        except (OSError, RuntimeError, TypeError) as e:
            raise ClipjaxError(f"{path!r} is not a sentencepiece model: {e}") from e
        self.eot_id = int(self.sp.eos_id())
        if self.eot_id < 0:
            raise ClipjaxError(f"sentencepiece model {path!r} defines no end-of-sentence piece")
        self.vocab_size = int(self.sp.vocab_size())
        self.context_length = int(context_length)
        if pad_id is None:
            pad_id = max(int(self.sp.pad_id()), 0)
        self.pad_id = int(pad_id)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["sp"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state):
        import sentencepiece as spm

        proto = state.pop("sp")
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_proto=proto)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            out.append(i)
        return self.sp.decode(out)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None
                 ) -> np.ndarray:
        rows = self.sp.encode(_as_list(texts))
        return _pack([[*r, self.eot_id] for r in rows], context_length or self.context_length,
                     self.eot_id, self.pad_id)


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise ClipjaxError(f"tokenizers take strings; got {type(t).__name__} {t!r:.60}")
    return texts


def _pack(rows: list[list[int]], length: int, end_id: int, pad_id: int) -> np.ndarray:
    """Rows into [N, length]: truncated with the end token kept last, then padded."""
    out = np.full((len(rows), length), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            row = row[:length]
            row[-1] = end_id
        out[i, :len(row)] = row
    return out


def _resolve_bpe_path(path: str) -> str:
    """The vocab to read: `path` (local, relative or gs://) when given, else clipjax's own."""
    if not path:
        return default_bpe_path()
    resolved = paths.to_str(path)
    if not _exists(resolved):
        raise ClipjaxError(
            f"CLIP BPE vocab {path!r} does not exist; set --config.model.tokenizer.path to "
            f"a copy of {VOCAB_FILE}, or leave it empty to use the one that ships in clipjax")
    return resolved


def _exists(path: str) -> bool:
    try:
        return paths.is_file(path)
    except OSError:
        return False


# --------------------------------------------------------------------------- building


def build_tokenizer(model_cfg) -> ClipBpeTokenizer | SentencePieceTokenizer:
    """The tokenizer `model_cfg` asks for, checked against the text tower.

    A fresh instance each call (the vocab file is parsed once per process).
    """
    kind = model_cfg.tokenizer.kind
    path = model_cfg.tokenizer.path
    length = int(model_cfg.text.context_length)
    pool = model_cfg.text.get("pool", "argmax")
    if kind == "clip_bpe":
        tok = ClipBpeTokenizer(path, context_length=length)
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer(path, context_length=length)
    else:
        raise ConfigError("model.tokenizer.kind", f"unknown tokenizer {kind!r}")
    if tok.vocab_size > model_cfg.text.vocab_size:
        raise ConfigError(
            "model.text.vocab_size",
            f"{model_cfg.text.vocab_size} is smaller than the {kind} tokenizer's vocabulary "
            f"({tok.vocab_size} ids, from {tok.path}); set it to at least {tok.vocab_size}")
    if pool == "argmax" and tok.eot_id != tok.vocab_size - 1:
        raise ConfigError(
            "model.text.pool",
            f"'argmax' pooling finds the end token as the highest id, but this {kind} "
            f"tokenizer's end token is {tok.eot_id} of {tok.vocab_size}; use "
            "--config.model.text.pool=last, or a model trained by train_sentencepiece")
    if pool == "last":
        tok.pad_id = tok.eot_id
    return tok


# --------------------------------------------------------------------------- training


def train_sentencepiece(texts_or_path: str | os.PathLike | Iterable[str], model_prefix: str,
                        vocab_size: int = 32000, *, model_type: str = "unigram",
                        lowercase: bool = False, character_coverage: float = 0.9995,
                        max_sentences: int = 10_000_000, seed: int = 0) -> str:
    """Trains a SentencePiece model on captions; returns the path of `PREFIX.model`.

    `texts_or_path` is a text file (one caption per line) or an iterable of
    strings. Ids: 0 = padding, 1 = unknown, `vocab_size - 1` = end of text, no
    start token; the end token is the highest id, so OpenAI-style `argmax`
    pooling finds it. `lowercase` folds case (as CLIP's BPE does).
    """
    import sentencepiece as spm

    if vocab_size < 4:
        raise ClipjaxError(f"vocab_size must be at least 4; got {vocab_size}")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ClipjaxError(f"model_type must be unigram, bpe, char or word; got {model_type!r}")
    options = dict(
        vocab_size=vocab_size, model_type=model_type, pad_id=0, unk_id=1, bos_id=-1,
        eos_id=vocab_size - 1, character_coverage=character_coverage,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        num_threads=os.cpu_count() or 1, minloglevel=2)
    spm.set_random_generator_seed(seed)  # the input-sampling shuffle
    model = io.BytesIO()
    try:
        if isinstance(texts_or_path, str | os.PathLike):
            source = paths.to_str(texts_or_path)
            if not _exists(source):
                raise ClipjaxError(f"caption file {os.fspath(texts_or_path)!r} does not exist")
            local = paths.local(source)
            if local is not None:
                spm.SentencePieceTrainer.train(input=local, model_writer=model, **options)
            else:  # a remote caption file: streamed line by line
                with paths.open(source, "rb") as f:
                    lines = (" ".join(raw.decode("utf-8", "replace").split()) for raw in f)
                    spm.SentencePieceTrainer.train(
                        sentence_iterator=(t for t in lines if t), model_writer=model,
                        **options)
        else:
            lines = (" ".join(str(t).split()) for t in texts_or_path)
            spm.SentencePieceTrainer.train(
                sentence_iterator=(t for t in lines if t), model_writer=model, **options)
    except RuntimeError as e:
        message = str(e).split("] ", 1)[-1].strip()
        if "pieces_size()" in str(e) or "Vocabulary size too high" in message:
            message = (f"vocab_size {vocab_size} is more pieces than this text supports; "
                       "lower the vocab size or train on more text")
        raise ClipjaxError(f"sentencepiece training failed: {message}") from e
    prefix = paths.to_str(model_prefix)
    path = prefix + ".model"
    paths.write_bytes(path, model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    paths.write_text(prefix + ".vocab", "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.vocab_size())))
    return path
