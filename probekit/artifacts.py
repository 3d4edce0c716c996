"""What a family trains per checkpoint (a tuned lens, a feature dictionary), kept beside the cube.

One safetensors file per family and checkpoint, ``RUN/artifacts/<family>/step_<N>.safetensors``,
holding the tensors and, in the file's metadata, a JSON training record (tokens, steps, final
loss, seed, what it was warm-started from). Written to a temporary name and renamed, so a
killed run leaves either the old file or the new one, never half of one. The cube holds what
is read from an artifact; the artifact lets a reader reload, inspect and reuse it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from probekit.errors import RunDirError

ARTIFACTS_DIR = "artifacts"
_RECORD_KEY = "probekit_record"


def artifact_path(run_dir: str | Path, family: str, step: int) -> Path:
    return Path(run_dir) / ARTIFACTS_DIR / family / f"step_{int(step):08d}.safetensors"


def save_artifact(
    run_dir: str | Path,
    family: str,
    step: int,
    tensors: dict[str, torch.Tensor],
    record: dict[str, Any],
) -> Path:
    """Write one checkpoint's trained tensors and their training record, atomically."""
    from safetensors.torch import save_file

    path = artifact_path(run_dir, family, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    # safetensors wants contiguous tensors that own their storage
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(tmp), metadata={_RECORD_KEY: json.dumps(record, default=str)})
    os.replace(tmp, path)
    return path


def load_artifact(
    run_dir: str | Path, family: str, step: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, training record) of one checkpoint; a one-line error when missing or unreadable."""
    from safetensors import safe_open

    path = artifact_path(run_dir, family, step)
    if not path.is_file():
        raise RunDirError(f"{path}: no stored {family} artifact for step {step}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            meta = fh.metadata() or {}
        record = json.loads(meta.get(_RECORD_KEY, "{}"))
    except Exception as exc:  # noqa: BLE001 - any damage: one line naming the file
        raise RunDirError(
            f"{path}: unreadable {family} artifact ({type(exc).__name__}); rebuild it with "
            f"`probekit align RUN --metrics {family} --recompute`"
        ) from None
    return tensors, record


def stored_artifact_steps(run_dir: str | Path, family: str) -> list[int]:
    """Steps that have a stored artifact of this family, in order."""
    folder = Path(run_dir) / ARTIFACTS_DIR / family
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.glob("step_*.safetensors"):
        try:
            steps.append(int(p.stem.split("_", 1)[1]))
        except ValueError:
            continue
    return sorted(steps)


def previous_artifact_step(run_dir: str | Path, family: str, step: int) -> int | None:
    """The latest stored step before ``step`` (the warm start), or None."""
    earlier = [s for s in stored_artifact_steps(run_dir, family) if s < step]
    return earlier[-1] if earlier else None
