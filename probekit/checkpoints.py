"""Checkpoint-series I/O, shared by the trainer (writes) and the analysis side (reads).

A series is a probekit run directory (RUN_DIR/checkpoints/step_NNNNNN/), any folder of
Hugging Face causal-LM checkpoint folders (checkpoint-N/, step_N/, global_stepN/, stepN/: the
step is the last number in the name, or probekit.json's), or a local Hugging Face hub cache of
one model with several revisions (models--ORG--NAME/refs/<revision> naming a folder under
snapshots/; the step is the last number in the revision's name). Nothing is ever fetched.
Writes are atomic: a folder is built as `.tmp-step_N` and renamed, so a folder named
`step_*` is always complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probekit.errors import RunDirError

STEP_DIR = "step_{:06d}"
META_FILE = "probekit.json"
STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"

__all__ = [
    "CheckpointInfo",
    "list_checkpoints",
    "hub_model_dir",
    "load_checkpoint",
    "save_checkpoint",
    "read_train_log",
    "write_train_log",
    "append_train_log",
]


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    tokens: float = math.nan  # NaN where the series does not say (foreign checkpoints)
    tokens_per_language: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_state(self) -> bool:
        return (self.path / STATE_FILE).is_file()


def _read_meta(folder: Path) -> dict:
    f = folder / META_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def read_meta(folder: Path | str) -> dict:
    """A checkpoint folder's probekit.json ({} if absent or unreadable)."""
    return _read_meta(Path(folder))


def step_of_name(name: str) -> int | None:
    """The step a folder or revision name gives: its last number (None without digits)."""
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None


def hub_refs(hub: Path) -> dict[str, str]:
    """A hub cache model folder's revisions: name -> the snapshot (commit) it names."""
    refs_dir = Path(hub) / "refs"
    return {
        f.relative_to(refs_dir).as_posix(): f.read_text().strip()
        for f in (sorted(refs_dir.rglob("*")) if refs_dir.is_dir() else [])
        if f.is_file()
    }


def _info(folder: Path) -> CheckpointInfo | None:
    meta = _read_meta(folder)
    step = meta.get("step")
    if step is None:
        digits = re.findall(r"\d+", folder.name)
        if not digits:
            return None
        step = int(digits[-1])
    return CheckpointInfo(
        step=int(step),
        path=folder,
        tokens=float(meta.get("tokens", math.nan)),
        tokens_per_language={k: float(v) for k, v in meta.get("tokens_per_language", {}).items()},
        meta=meta,
    )


def list_checkpoints(
    run_dir_or_series: Path | str,
    model: str | None = None,
    revisions: list[str] | tuple[str, ...] | None = None,
) -> list[CheckpointInfo]:
    """Every checkpoint of a run directory, of a folder of HF checkpoints, or of a local hub
    cache (`model` ORG/NAME picks one of several cached models; `revisions` picks revisions,
    default every revision whose name holds a step), by step."""
    path = Path(run_dir_or_series)
    hub = hub_model_dir(path, model)
    if hub is not None:
        return _hub_checkpoints(hub, revisions)
    if revisions:
        raise RunDirError(f"{path}: --revisions needs a Hugging Face hub cache (models--ORG--NAME)")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise RunDirError(f"no checkpoints found in {path}")
    infos: dict[int, CheckpointInfo] = {}
    candidates = [root] if (root / "config.json").is_file() else sorted(root.iterdir())
    for sub in candidates:
        # dot-folders are unfinished (.tmp-*) or set aside (.corrupt-*)
        if not sub.is_dir() or sub.name.startswith(".") or not (sub / "config.json").is_file():
            continue
        info = _info(sub)
        if info is None:
            raise RunDirError(
                f"{sub}: cannot tell the step (no digits in its name, no {META_FILE})"
            )
        if info.step in infos:
            raise RunDirError(f"{sub}: step {info.step} also in {infos[info.step].path.name}")
        infos[info.step] = info
    if not infos:
        raise RunDirError(f"no checkpoints found in {path}")
    return [infos[s] for s in sorted(infos)]


def hub_model_dir(path: Path | str, model: str | None = None) -> Path | None:
    """The `models--ORG--NAME` folder of a local hub cache at `path` (the cache or the model's
    own folder), or None when `path` is not a hub cache. Several cached models need `model`."""
    path = Path(path)
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        if model and path.name != _hub_name(model):
            raise RunDirError(f"{path}: this is the cache of {_repo(path.name)}, not {model}")
        return path
    if not path.is_dir():
        return None
    cached = sorted(p for p in path.glob("models--*") if p.is_dir() and (p / "snapshots").is_dir())
    if not cached:
        if model:
            raise RunDirError(f"{path}: not a Hugging Face hub cache (no models--*/snapshots)")
        return None
    names = ", ".join(_repo(p.name) for p in cached)
    if model:
        hit = path / _hub_name(model)
        if hit not in cached:
            raise RunDirError(f"{path}: model {model} is not in this cache (cached: {names})")
        return hit
    if len(cached) > 1:
        raise RunDirError(f"{path}: several models are cached ({names}); pick one with --model")
    return cached[0]


def _hub_name(model: str) -> str:
    return "models--" + model.strip("/").replace("/", "--")


def _repo(folder_name: str) -> str:
    return folder_name[len("models--") :].replace("--", "/")


def _hub_checkpoints(
    hub: Path, revisions: list[str] | tuple[str, ...] | None
) -> list[CheckpointInfo]:
    refs = hub_refs(hub)
    snapshots = hub / "snapshots"
    if revisions:
        missing = [r for r in revisions if r not in refs]
        if missing:
            raise RunDirError(
                f"{hub}: revision(s) {', '.join(missing)} not in the cache "
                f"(cached: {', '.join(_by_step(refs)) or 'none'})"
            )
        wanted = list(revisions)
    else:
        wanted = [r for r in _by_step(refs) if re.search(r"\d", r)]
    infos: dict[int, CheckpointInfo] = {}
    for rev in wanted:
        digits = re.findall(r"\d+", rev)
        if not digits:
            raise RunDirError(f"{hub}: cannot tell the step of revision {rev!r} (no digits)")
        folder = snapshots / refs[rev]
        if not (folder / "config.json").is_file():
            raise RunDirError(f"{hub}: revision {rev} names snapshot {refs[rev]}, not cached")
        step = int(digits[-1])
        if step in infos:
            continue  # two names of one step (e.g. main and step143000)
        infos[step] = CheckpointInfo(step=step, path=folder, meta={"revision": rev})
    if not infos:
        raise RunDirError(f"no checkpoints found in {hub} (no revision names a step)")
    return [infos[s] for s in sorted(infos)]


def _by_step(refs: dict[str, str]) -> list[str]:
    def key(rev: str) -> tuple[int, str]:
        digits = re.findall(r"\d+", rev)
        return (int(digits[-1]) if digits else -1, rev)

    return sorted(refs, key=key)


def select_checkpoints(
    ckpts: list[CheckpointInfo], steps: Any, where: Path | str
) -> list[CheckpointInfo]:
    """The checkpoints of the given steps (all if none): a list of step numbers, or a sample
    (`every:N`, `log:K`, `range:A:B[:S]`, see probekit.revisions); a missing step is a
    one-line error."""
    from probekit.revisions import sample_steps

    steps = sample_steps([c.step for c in ckpts], steps, where)
    if not steps:
        return ckpts
    have = {c.step for c in ckpts}
    missing = [s for s in steps if s not in have]
    if missing:
        raise RunDirError(
            f"{where}: no checkpoint for step(s) {', '.join(map(str, missing))} "
            f"(have: {sorted(have)})"
        )
    return [c for c in ckpts if c.step in set(steps)]


# A series' checkpoints share one architecture. With load_checkpoint(reuse=True), a model of up
# to this many bytes is kept, and the next checkpoint with the same config.json and a single
# model.safetensors is read into it (~4 ms for a tiny model, against ~33 ms to build one
# through from_pretrained). Bigger models are built afresh: their build is a small part of
# their analysis, and keeping one would double the memory held. The analysis side's bridge
# (hooks.bridge_for) keeps by the same limit, so that a kept model is never rewrapped.
KEEP_MAX_BYTES = 128 * 2**20
WEIGHTS_FILE = "model.safetensors"


@dataclass
class _Kept:
    config_text: str
    device: str
    model: Any
    dtype: str | None = None


_kept: _Kept | None = None
_SAFETENSORS_DTYPES = {
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.bool": "BOOL",
}
_FLOAT_STORED = {"F32", "F16", "BF16", "F64"}


def load_checkpoint(
    info: CheckpointInfo | Path | str,
    device: str = "cpu",
    reuse: bool = False,
    dtype: str | None = None,
) -> Any:
    """The checkpoint's model (`AutoModelForCausalLM`), in eval mode on `device`.

    local_files_only: a folder is read from disk only, never looked up on the hub.
    ``reuse``: the model may be the one the previous ``reuse`` call returned, its weights
    overwritten with this checkpoint's (same config.json, weights in one model.safetensors
    of the same names, shapes and dtypes); the caller must be done with that one.
    ``dtype`` (float32 | bfloat16 | float16): the floating parameters are cast to it; buffers
    keep theirs (a rotary inv_freq stays float32, as TransformerLens' own cast does). None:
    as stored (no cast).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    global _kept
    path = info.path if isinstance(info, CheckpointInfo) else Path(info)
    if reuse:
        model = _read_into_kept(path, str(device), dtype)
        if model is not None:
            return model
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the folder is unusable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RunDirError(
            f"{path}: cannot load checkpoint ({type(exc).__name__}: {first[:200]})"
        ) from None
    model = model.to(device).eval()
    if dtype is not None:
        cast_parameters(model, dtype)
    if reuse:
        config = path / "config.json"
        ok = small_enough_to_keep(model) and config.is_file() and (path / WEIGHTS_FILE).is_file()
        _kept = _Kept(config.read_text(), str(device), model, dtype) if ok else None
    return model


def cast_parameters(model: Any, dtype: str) -> Any:
    """Cast `model`'s floating parameters to `dtype` in place (tied ones stay tied: each
    Parameter object keeps its identity); a parameter already in it is not touched."""
    import torch

    target = getattr(torch, dtype)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
    return model


def small_enough_to_keep(model: Any, state: dict | None = None) -> bool:
    """Whether `model` (its ``state_dict()``, if already at hand) is within KEEP_MAX_BYTES."""
    state = model.state_dict() if state is None else state
    return sum(t.numel() * t.element_size() for t in state.values()) <= KEEP_MAX_BYTES


def release_kept() -> None:
    """Drop the model kept by ``load_checkpoint(reuse=True)``."""
    global _kept
    _kept = None


def _read_into_kept(path: Path, device: str, dtype: str | None = None) -> Any | None:
    """The kept model with `path`'s weights, or None where they do not fit it exactly.
    With `dtype` the floating tensors are cast into the kept model's (as a fresh load casts
    them); without, every stored dtype must be the model's."""
    global _kept
    from safetensors import safe_open
    from safetensors.torch import load_model

    kept = _kept
    weights = path / WEIGHTS_FILE
    try:
        if kept is None or kept.device != device or kept.dtype != dtype or not weights.is_file():
            return None
        if (path / "config.json").read_text() != kept.config_text:
            return None
        state = kept.model.state_dict()
        with safe_open(weights, framework="pt") as f:
            names = set(f.keys())
            # tied tensors are stored once: every stored name must be the model's, with its
            # shape and dtype (no silent cast), and every name it lacks must be a tied alias
            fits = names <= state.keys() and all(
                tuple(f.get_slice(n).get_shape()) == tuple(state[n].shape)
                and (
                    f.get_slice(n).get_dtype() == _SAFETENSORS_DTYPES.get(str(state[n].dtype))
                    or (
                        dtype is not None
                        and state[n].is_floating_point()
                        and f.get_slice(n).get_dtype() in _FLOAT_STORED
                    )
                )
                for n in names
            )
        if not fits:
            return None
        load_model(kept.model, weights, strict=True, device=device)
        kept.model.config.name_or_path = str(path)  # as from_pretrained sets it
    except Exception:  # noqa: BLE001 - a file that does not read: from_pretrained says why
        _kept = None  # possibly half-overwritten
        return None
    return kept.model.eval()


def save_checkpoint(
    model: Any,
    checkpoints_dir: Path,
    step: int,
    meta: dict,
    training_state: dict | None = None,
    keep_state: int | None = None,
) -> Path:
    """Write checkpoints_dir/step_NNNNNN atomically; keep training_state.pt on the newest
    `keep_state` checkpoints only (older states are large and never needed)."""
    import torch
    from transformers.utils import logging as hf_logging

    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    name = STEP_DIR.format(step)
    final, tmp = checkpoints_dir / name, checkpoints_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=1) + "\n")
    if training_state is not None:
        torch.save(training_state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():  # a rerun of a deterministic step: replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_state is not None:
        with_state = [i for i in list_checkpoints(checkpoints_dir) if i.has_state]
        for old in with_state[: max(len(with_state) - keep_state, 0)]:
            (old.path / STATE_FILE).unlink(missing_ok=True)
    return final


def _fsync_dir(folder: Path) -> None:
    # flush file contents before the rename makes the folder count as complete
    for f in folder.iterdir():
        try:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        except OSError:
            pass


def read_train_log(run_dir: Path | str) -> list[dict]:
    """The records of RUN_DIR/train_log.jsonl (a torn last line from a kill is skipped)."""
    f = Path(run_dir) / LOG_FILE
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def write_train_log(run_dir: Path | str, records: list[dict]) -> None:
    """Rewrite the log atomically (used on resume to drop lines past the resumed step)."""
    f = Path(run_dir) / LOG_FILE
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, f)


def append_train_log(run_dir: Path | str, record: dict) -> None:
    with open(Path(run_dir) / LOG_FILE, "a") as fh:
        fh.write(json.dumps(record) + "\n")
