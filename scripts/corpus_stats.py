"""Corpus sizes per language and split, and the example configs' tokens and vocabularies.

python scripts/corpus_stats.py               # both tables (fresh token cache: times from scratch)
python scripts/corpus_stats.py --languages   # only the shipped Bibles per language and split

The per-language table trains one 512-piece byte-level BPE per corpus language (the trainer's
defaults: min_frequency 2, seed 0) on the training split of all of that language's shipped
Bibles, then counts, for every Bible and split, verses, characters (of the verse texts) and
BPE tokens (of the split's documents, one per book, without the <|endoftext|> separators).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ["PROBEKIT_CACHE"] = tempfile.mkdtemp()

from probekit.data import corpus  # noqa: E402
from probekit.data.vocab import train_bpe  # noqa: E402

CONFIGS = [
    "examples/clone_90_10.toml",
    "examples/enfr_disjoint_90_10.toml",
    "examples/enfr_anchored_90_10.toml",
]
VOCAB_SIZE = 512


def language_table() -> None:
    """Verses, characters and 512-piece BPE tokens of every shipped Bible, per split."""
    print(f"shipped Bibles: {VOCAB_SIZE}-piece BPE per language, trained on its train split")
    head = f"{'lang':<5}{'source':<15}{'split':<10}{'verses':>8}{'chars':>12}{'tokens':>12}"
    print(head)
    for lang in corpus.BIBLE_LANGUAGES:
        names = corpus.bibles_of(lang)
        train = [d for n in names for d in corpus.source_docs(f"bible:{n}", "train")]
        tok = train_bpe(train, VOCAB_SIZE, 2, 0)
        for name in names:
            verses = corpus.bible_verses(name)
            for split in corpus.SPLITS:
                texts = [t for b, _, _, t in verses if corpus.book_split(b) == split]
                docs = corpus.source_docs(f"bible:{name}", split)
                tokens = sum(len(e.ids) for e in tok.encode_batch(docs))
                chars = sum(map(len, texts))
                print(
                    f"{lang:<5}{'bible:' + name:<15}{split:<10}{len(texts):>8,}{chars:>12,}"
                    f"{tokens:>12,}"
                )


def config_table() -> None:
    from probekit.config import load_config
    from probekit.data import prepare_run_data

    for name in CONFIGS:
        data = prepare_run_data(load_config(name), tempfile.mkdtemp())
        vocab = data.vocab
        print(f"{name}: model vocabulary {vocab.model_vocab_size}, {vocab.info}")
        for lang in vocab.languages:
            train = int(data.train_token_counts(lang).sum())
            test, _ = data.test_tokens(lang)
            print(f"  {lang}: train {train:,} tokens, test {len(test):,} tokens")
        par = data.parallel(vocab.languages[0], vocab.languages[1], 10**6, 128)
        sizes = sum(map(len, par.ids1)), sum(map(len, par.ids2))
        print(
            f"  parallel pairs of <= 128 tokens: {len(par):,} ({sizes[0]:,} / {sizes[1]:,} tokens)"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--languages", action="store_true", help="only the per-language table")
    args = ap.parse_args(argv)
    start = time.time()
    language_table()
    print(f"per-language table: {time.time() - start:.1f} s")
    if not args.languages:
        start = time.time()
        config_table()
        print(f"tokenizers and tokenization from scratch: {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
