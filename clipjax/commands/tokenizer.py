"""`clipjax tokenizer train|encode`: make a SentencePiece model; show a config's token ids."""

from __future__ import annotations

import argparse

HELP = "train a SentencePiece tokenizer on captions, or print the token ids of texts"
TAKES_CONFIG = True  # receives --config / --config.k=v (clipjax/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser(
        "train", help="train a SentencePiece model on a caption file (one caption per line)",
        description="Writes PREFIX.model and PREFIX.vocab. Ids: 0 = padding, 1 = unknown, "
                    "vocab_size-1 = end of text (the highest id, as CLIP's argmax pooling "
                    "expects). Use it with --config.model.tokenizer.kind=sentencepiece "
                    "--config.model.tokenizer.path=PREFIX.model.")
    train.add_argument("--input", required=True,
                       help="text file, one caption per line (local or gs://)")
    train.add_argument("--out", required=True, metavar="PREFIX",
                       help="output path prefix (local or gs://)")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--model-type", default="unigram",
                       choices=("unigram", "bpe", "char", "word"))
    train.add_argument("--lowercase", action="store_true", help="fold case before encoding")
    train.add_argument("--max-sentences", type=int, default=10_000_000,
                       help="train on a random sample of at most this many captions")
    encode = sub.add_parser(
        "encode", help="print the token ids of each TEXT under a config's tokenizer",
        description="Prints one line per text: the ids up to and including the end token. "
                    "Takes --config FILE.py and --config.model.tokenizer.* overrides "
                    "(default: OpenAI's CLIP BPE, 77 tokens).")
    encode.add_argument("texts", nargs="+", metavar="TEXT")
    encode.add_argument("--full", action="store_true",
                        help="print the whole padded row of context_length ids")


def run(args) -> int:
    if args.action == "train":
        from clipjax.data.tokenizers import train_sentencepiece

        path = train_sentencepiece(
            args.input, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
            lowercase=args.lowercase, max_sentences=args.max_sentences)
        print(f"wrote {path} ({args.vocab_size} pieces)")
        return 0
    from clipjax import config as config_lib
    from clipjax.data.tokenizers import build_tokenizer

    config_arg = None
    overrides = []
    for a in args.config_args:
        if a.startswith("--config="):
            config_arg = a.split("=", 1)[1]
        else:
            overrides.append(a)
    config = config_lib.load(config_arg, overrides)
    tokenizer = build_tokenizer(config.model)
    for row in tokenizer(args.texts):
        if not args.full:
            end = [i for i, t in enumerate(row) if t == tokenizer.eot_id]
            row = row[:end[0] + 1] if end else row
        print(" ".join(str(int(t)) for t in row))
    return 0
