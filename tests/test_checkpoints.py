"""Checkpoint-series I/O: our run directories and foreign folders of HF checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from probekit.checkpoints import (
    append_train_log,
    list_checkpoints,
    load_checkpoint,
    read_train_log,
    save_checkpoint,
    write_train_log,
)
from probekit.errors import RunDirError
from probekit.training import build_model


@pytest.fixture(scope="module")
def model():
    return build_model({"preset": "nano"}, 300, seed=0)


def test_save_is_atomic_and_keeps_state_on_newest_only(model, tmp_path):
    ck = tmp_path / "run" / "checkpoints"
    for step in (0, 5, 10):
        save_checkpoint(model, ck, step, {"tokens": step * 10}, {"step": step}, keep_state=2)
    assert sorted(p.name for p in ck.iterdir()) == ["step_000000", "step_000005", "step_000010"]
    infos = list_checkpoints(tmp_path / "run")
    assert [i.step for i in infos] == [0, 5, 10]
    assert [i.has_state for i in infos] == [False, True, True]
    assert infos[1].tokens == 50 and infos[1].meta["step"] == 5


def test_unfinished_and_corrupt_folders_are_not_listed(model, tmp_path):
    save_checkpoint(model, tmp_path, 3, {})
    (tmp_path / ".tmp-step_000004").mkdir()  # a killed write
    (tmp_path / ".corrupt-step_000002").mkdir()
    (tmp_path / ".corrupt-step_000002" / "config.json").write_text("{}")
    assert [i.step for i in list_checkpoints(tmp_path)] == [3]


def test_foreign_hf_series(model, tmp_path):
    for name in ("checkpoint-1000", "checkpoint-200", "step_50"):
        model.save_pretrained(tmp_path / name)
    (tmp_path / "logs").mkdir()  # not a checkpoint: no config.json
    infos = list_checkpoints(tmp_path)
    assert [i.step for i in infos] == [50, 200, 1000]
    assert math.isnan(infos[0].tokens)
    m = load_checkpoint(infos[-1])
    assert not m.training
    assert m.lm_head.weight.data_ptr() != m.transformer.wte.weight.data_ptr()
    for a, b in zip(model.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a single checkpoint folder is a series of one
    assert [i.step for i in list_checkpoints(tmp_path / "step_50")] == [50]


def test_step_from_probekit_json_wins(model, tmp_path):
    model.save_pretrained(tmp_path / "final")
    (tmp_path / "final" / "probekit.json").write_text(json.dumps({"step": 77, "tokens": 9}))
    (info,) = list_checkpoints(tmp_path)
    assert info.step == 77 and info.tokens == 9


def test_errors_name_the_folder(model, tmp_path):
    with pytest.raises(RunDirError, match="no checkpoints found in"):
        list_checkpoints(tmp_path)
    path = save_checkpoint(model, tmp_path, 1, {})
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunDirError, match="step_000001: cannot load checkpoint"):
        load_checkpoint(list_checkpoints(tmp_path)[0])


def test_train_log_round_trip_and_torn_line(tmp_path):
    write_train_log(tmp_path, [{"step": 1, "loss": 2.0}])
    append_train_log(tmp_path, {"step": 2, "loss": 1.5})
    with open(tmp_path / "train_log.jsonl", "a") as fh:
        fh.write('{"step": 3, "lo')  # torn by a kill
    assert [r["step"] for r in read_train_log(tmp_path)] == [1, 2]
    assert read_train_log(tmp_path / "missing") == []


def _tied_gpt2(seed: int, vocab: int = 300):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_layer=2, n_embd=32, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_reuse_reads_the_next_checkpoint_into_the_kept_model(model, tmp_path, tied):
    """load_checkpoint(reuse=True): the same model object, its weights those of each
    checkpoint bit for bit (a tied head stays tied); a new config, a model over the size
    limit or an unreadable file builds afresh, and a broken file still fails in one line."""
    from probekit import checkpoints

    models = [
        _tied_gpt2(s) if tied else build_model({"preset": "nano"}, 300, seed=s) for s in (0, 1)
    ]
    for step, m in enumerate(models):
        save_checkpoint(m, tmp_path, step, {})
    infos = list_checkpoints(tmp_path)
    checkpoints.release_kept()
    first = load_checkpoint(infos[0], reuse=True)
    second = load_checkpoint(infos[1], reuse=True)
    assert second is first and not second.training
    assert second.config.name_or_path == str(infos[1].path)
    fresh = load_checkpoint(infos[1])
    for (k, a), (k2, b) in zip(
        second.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k
    head, emb = second.get_output_embeddings().weight, second.get_input_embeddings().weight
    assert (head is emb) == tied
    # back to the first checkpoint: its weights again
    again = load_checkpoint(infos[0], reuse=True)
    assert again is first
    for a, b in zip(again.state_dict().values(), models[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # another configuration: built afresh (and kept in its turn)
    other = tmp_path / "other"
    save_checkpoint(
        _tied_gpt2(2, vocab=301) if tied else build_model({"preset": "nano"}, 301, seed=2),
        other,
        5,
        {},
    )
    assert load_checkpoint(list_checkpoints(other)[0], reuse=True) is not first
    # a corrupt file: the one-line error, and nothing half-read is kept
    (infos[1].path / "model.safetensors").write_bytes(b"not safetensors")
    load_checkpoint(infos[0], reuse=True)
    with pytest.raises(RunDirError, match="cannot load checkpoint"):
        load_checkpoint(infos[1], reuse=True)
    assert checkpoints._kept is None
    checkpoints.release_kept()


def test_reuse_keeps_no_model_over_the_limit(model, tmp_path, monkeypatch):
    from probekit import checkpoints

    for step in (0, 1):
        save_checkpoint(model, tmp_path, step, {})
    infos = list_checkpoints(tmp_path)
    monkeypatch.setattr(checkpoints, "KEEP_MAX_BYTES", 0)
    checkpoints.release_kept()
    first = load_checkpoint(infos[0], reuse=True)
    assert checkpoints._kept is None
    assert load_checkpoint(infos[1], reuse=True) is not first
