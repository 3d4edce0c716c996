"""Tokens per language and split, vocabulary sizes and build time of the example configs.

python scripts/corpus_stats.py      # uses a fresh token cache, so the time is from scratch
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ["PROBEKIT_CACHE"] = tempfile.mkdtemp()

from probekit.config import load_config  # noqa: E402
from probekit.data import prepare_run_data  # noqa: E402

CONFIGS = [
    "examples/clone_90_10.toml",
    "examples/enfr_disjoint_90_10.toml",
    "examples/enfr_anchored_90_10.toml",
]


def main() -> None:
    start = time.time()
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
    print(f"tokenizers and tokenization from scratch: {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
