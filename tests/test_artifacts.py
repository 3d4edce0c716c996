import pytest
import torch

from probekit.artifacts import (
    artifact_path,
    load_artifact,
    previous_artifact_step,
    save_artifact,
    stored_artifact_steps,
)
from probekit.errors import RunDirError


def test_round_trip_and_previous(tmp_path):
    t = {"w": torch.arange(6.0).reshape(2, 3)[:, 1:], "b": torch.ones(2)}  # a non-contiguous view
    for step in (0, 10, 30):
        save_artifact(tmp_path, "fam", step, t, {"steps": step, "kl": 0.5})
    got, record = load_artifact(tmp_path, "fam", 10)
    assert torch.equal(got["w"], t["w"]) and torch.equal(got["b"], t["b"])
    assert record == {"steps": 10, "kl": 0.5}
    assert stored_artifact_steps(tmp_path, "fam") == [0, 10, 30]
    assert previous_artifact_step(tmp_path, "fam", 30) == 10
    assert previous_artifact_step(tmp_path, "fam", 0) is None
    assert not list(artifact_path(tmp_path, "fam", 0).parent.glob(".tmp-*"))


def test_missing_and_damaged_are_one_line(tmp_path):
    with pytest.raises(RunDirError, match="no stored fam artifact for step 5"):
        load_artifact(tmp_path, "fam", 5)
    save_artifact(tmp_path, "fam", 5, {"w": torch.ones(3)}, {})
    path = artifact_path(tmp_path, "fam", 5)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RunDirError, match="unreadable fam artifact") as err:
        load_artifact(tmp_path, "fam", 5)
    assert "\n" not in str(err.value)
