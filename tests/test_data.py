"""Corpus splits, tokenizers, vocabulary maps, mixtures and schedules."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_cfg

from probekit.config import load_config
from probekit.data import build_vocabulary, prepare_run_data
from probekit.data import corpus as corpus_mod
from probekit.data.mixture import parse_schedule
from probekit.data.vocab import PAD_ID, Vocabulary
from probekit.errors import ConfigError


@pytest.fixture(scope="module")
def clone_data(tmp_path_factory):
    cfg = load_config(tiny_cfg(p=0.1, clones=2))
    return prepare_run_data(cfg, tmp_path_factory.mktemp("run"))


def test_splits_are_disjoint_by_book():
    train = set(corpus_mod.source_docs("bible:web", "train"))
    test = set(corpus_mod.source_docs("bible:web", "test"))
    par = set(corpus_mod.source_docs("bible:web", "parallel"))
    assert len(test) == 4 and len(par) == 3 and len(train) == 66 - 7
    assert not (train & test) and not (train & par) and not (test & par)
    assert corpus_mod.source_docs("prose:austen", "test")  # Persuasion
    assert not corpus_mod.source_docs("prose:austen", "parallel")


def test_clone_ids_round_trip_through_vocab_map(clone_data, tmp_path):
    vocab = clone_data.vocab
    v = vocab.info["base_vocab_size"]
    assert vocab.languages == ["EN1", "EN2", "EN3"] and vocab.model_vocab_size == 3 * v
    ids = vocab.encode(["In the beginning God created the heavens and the earth."], "EN2")[0]
    assert ids.min() >= v  # EN2 ids are shifted by V
    for i in ids:
        ((lang, piece),) = vocab.lookup(int(i))
        assert lang == "EN2" and piece == vocab.piece("EN1", int(i) - v)
    assert vocab.lookup(PAD_ID) == [("EN1", "<pad>"), ("EN2", "<pad>"), ("EN3", "<pad>")]
    vocab.save(tmp_path)
    again = Vocabulary.load(tmp_path)
    assert again.fingerprint == vocab.fingerprint
    assert all(np.array_equal(again.to_model[k], vocab.to_model[k]) for k in vocab.languages)
    assert "vocab_map.json" in {p.name for p in tmp_path.iterdir()}


def test_clone_streams_identical_after_unshifting(clone_data):
    v = clone_data.vocab.info["base_vocab_size"]
    en1, _ = clone_data.test_tokens("EN1")
    en2, _ = clone_data.test_tokens("EN2")
    assert np.array_equal(en1, en2 - v * (en2 >= v))
    par = clone_data.parallel("EN1", "EN2", 16, 32)
    assert par.aligned and len(par) == 16
    for a, b in zip(par.ids1, par.ids2, strict=True):
        assert np.array_equal(a, b - v)


def test_padding_never_cloned_and_partial_cloning(tmp_path):
    cfg = load_config(tiny_cfg(frac_clone=0.6))
    vocab = prepare_run_data(cfg, tmp_path).vocab
    v = vocab.info["base_vocab_size"]
    assert vocab.to_model["EN2"][PAD_ID] == PAD_ID
    shared = vocab.shared_ids("EN1", "EN2")
    assert abs(len(shared) - 0.4 * (v - 1)) <= 1
    assert len(vocab.clone_pairs("EN1", "EN2")) == vocab.info["n_cloned"]
    again = build_vocabulary(cfg)  # the subset is seeded
    assert np.array_equal(again.to_model["EN2"], vocab.to_model["EN2"])


def test_tokenizer_reproducible():
    cfg = load_config(tiny_cfg())
    a, b = build_vocabulary(cfg), build_vocabulary(cfg)
    assert a.tokenizers["base"].to_str() == b.tokenizers["base"].to_str()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_empirical_share_matches_p(clone_data, p):
    clone_data.cfg.data.p = p
    stream = clone_data.stream(20_000, 32)
    langs = stream.languages_of(0, 20_000)
    assert abs((langs > 0).mean() - p) < 0.01
    # with two clones the share splits equally between them
    assert abs((langs == 1).mean() - (langs == 2).mean()) < 0.015


def test_schedule_stages_and_mean_share(clone_data):
    clone_data.cfg.data.schedule = "0.1_0.9_0.5_0.5"
    stream = clone_data.stream(20_000, 32)
    langs = stream.languages_of(0, 20_000) > 0
    for k, target in enumerate([0.1, 0.9, 0.5, 0.5]):
        assert abs(langs[k * 5000 : (k + 1) * 5000].mean() - target) < 0.02
    assert parse_schedule("0.1_0.9_0.5_0.5").mean_share == pytest.approx(0.5)
    assert parse_schedule("0.05_0.65_0.65_0.65").mean_share == pytest.approx(0.5)
    assert parse_schedule("linear:0.1:0.5").mean_share == pytest.approx(0.3)
    assert parse_schedule({"fractions": [0.2, 0.8], "p": [0.9, 0.1]}).mean_share == pytest.approx(
        0.26
    )
    counts = stream.language_counts(20_000)
    assert counts.sum() == 20_000 and counts[0] == (~langs).sum()
    clone_data.cfg.data.schedule = ""


def test_sequences_are_restart_safe(clone_data):
    stream = clone_data.stream(5_000, 32)
    ids, langs = stream.sequences(0, 300)
    ids2, langs2 = stream.sequences(100, 200)  # a restart from sequence 100
    assert np.array_equal(ids[100:], ids2) and np.array_equal(langs[100:], langs2)


_SEQ_SCRIPT = """
import hashlib, sys
from probekit.config import load_config
from probekit.data import prepare_run_data
cfg = load_config({cfg!r})
ids, langs = prepare_run_data(cfg, {run!r}).stream(100_000, 32).sequences(0, 1000)
print(hashlib.sha256(ids.tobytes() + langs.tobytes()).hexdigest())
"""


def test_same_seed_same_stream_in_two_processes(tmp_path):
    cfg = tiny_cfg()
    outs = []
    for i in range(2):
        script = _SEQ_SCRIPT.format(cfg=cfg, run=str(tmp_path / f"r{i}"))
        res = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        outs.append(res.stdout.strip())
    assert outs[0] == outs[1] and len(outs[0]) == 64


def test_pair_vocabularies_and_parallel(tmp_path):
    base = {"mode": "pair", "p": 0.1, "sources": {"en": ["bible:web"], "fr": ["bible:segond"]}}
    sizes = {}
    for mode in ("disjoint", "anchored", "joint"):
        cfg = load_config(
            {
                "data": base,
                "tokenizer": {"vocab_size": 300, "vocab_mode": mode},
                "model": {"preset": "nano"},
            }
        )
        data = prepare_run_data(cfg, tmp_path / mode)
        sizes[mode] = data.vocab.model_vocab_size
        if mode == "anchored":
            n = data.vocab.info["n_anchored"]
            assert 0 < n < 300 and build_vocabulary(cfg).info["n_anchored"] == n  # stable
            assert len(data.vocab.shared_ids("EN", "FR")) == n
        par = data.parallel("EN", "FR", 8, 64)
        assert not par.aligned and len(par) == 8
        assert all(16 <= len(x) <= 64 for x in par.ids1 + par.ids2)
        fr_ids = np.concatenate(par.ids2)
        if mode == "disjoint":
            assert fr_ids.min() >= 300 or set(fr_ids) & {0}
    assert sizes["joint"] == 300 and sizes["anchored"] < sizes["disjoint"] == 599


def test_user_text_sources(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(25):
        (folder / f"doc{i:02d}.txt").write_text(
            f"Document {i}. " + "Some words of text here. " * 40
        )
    cfg = load_config(
        {
            "data": {"mode": "mono", "sources": {"en": [str(folder)]}},
            "tokenizer": {"vocab_size": 280},
            "model": {"preset": "nano"},
        }
    )
    data = prepare_run_data(cfg, tmp_path / "run")
    test, chars = data.test_tokens("EN")
    assert len(test) > 0 and chars > 0
    assert len(corpus_mod.source_docs(str(folder), "test")) == 1  # every 20th file


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"data": {"p": 1.5}}, "data.p"),
        ({"data": {"schedule": "0.1_x"}}, "data.schedule"),
        ({"data": {"mode": "triple"}}, "data.mode"),
        ({"data": {"clones": 2, "frac_clone": 0.5}}, "data.frac_clone"),
        ({"data": {"sources": {"en": ["/no/such/file.txt"]}}}, "not found"),
        ({"data": {"sources": {"en": ["bible:vulgate"]}}}, "unknown Bible"),
        ({"tokenizer": {"vocab_mode": "merged"}}, "tokenizer.vocab_mode"),
        ({"model": {"preset": "huge"}}, "model.preset"),
        ({"data": {"colour": 1}}, "data.colour"),
        ({"data": {"mode": "pair", "languages": ["en", "de"]}}, "data.sources.de"),
    ],
)
def test_bad_config_names_the_field(patch, field, tmp_path):
    cfg = tiny_cfg()
    for section, values in patch.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        prepare_run_data(load_config(cfg), tmp_path)


def test_overrides_and_dump_round_trip(tmp_path):
    from probekit.config import dump_config

    cfg = load_config(tiny_cfg(), ["data.p=0.25", "train.lr=1e-3", "data.schedule=0.1_0.9"])
    assert cfg.data.p == 0.25 and cfg.train.lr == 1e-3
    assert cfg.data.schedule == "0.1_0.9"
    path = tmp_path / "c.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert json.dumps(cfg.to_dict())  # plain data
    assert list(cfg.to_dict()) == ["seed", "name", "data", "tokenizer", "model", "train"] + [
        "checkpoints",
        "eval",
    ]
