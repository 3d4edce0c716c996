"""A series' revisions checked before any analysis is spent on them (`probekit check`).

Real series have faulty revisions: EleutherAI/pythia#205 found 86 of pythia-2.8b's 154 step
branches serving final-era weights. Flagged, one line per problem:

- ``duplicate``: a revision whose weights equal another's (a hash of every tensor's name,
  dtype, shape and bytes, streamed from the weight files; no model is built);
- ``order``: a checkpoint whose recorded step (probekit.json `step`, trainer_state.json
  `global_step`) disagrees with its name, two folders of one step, or recorded token counts
  that fall as the step rises;
- ``missing``: a revision or snapshot not in the cache, a checkpoint folder without
  config.json or without weights;
- ``unreadable``: a config.json or weight file that does not parse or is cut short.

By default each tensor's hash covers a fixed sample of its bytes (SAMPLE_BLOCKS blocks of
SAMPLE_BLOCK bytes, evenly spaced, first and last included; a tensor smaller than that is read
whole), so the check reads at most a few MB per checkpoint whatever the model's size; ``full``
hashes every byte. Training moves every weight, so two different revisions agreeing on every
sampled block is not a practical risk; ``probekit check --full`` confirms a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probekit.checkpoints import (
    META_FILE,
    CheckpointInfo,
    hub_model_dir,
    hub_refs,
    read_meta,
    select_checkpoints,
    step_of_name,
)
from probekit.errors import RunDirError

SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 4096
CHUNK = 16 * 2**20  # full hashes read this much at a time
TRAINER_STATE = "trainer_state.json"
_CKPT_NAME = re.compile(r"(checkpoint-|step_?|global_step)\d+")

__all__ = ["Problem", "check_series", "check_checkpoints", "weights_hash", "summary_line"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one revision."""

    kind: str  # duplicate | order | missing | unreadable
    where: str  # the revision or folder name
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.kind}: {self.message}"


def check_series(
    path: str | Path,
    model: str | None = None,
    revisions: Iterable[str] | None = None,
    steps: object = None,
    full: bool = False,
) -> list[Problem]:
    """Every problem of a series (run directory, folder of HF checkpoints or hub cache), one
    `Problem` per revision and fault; [] for a clean series. `revisions` (hub cache names) and
    `steps` (step numbers or a sample such as ``"every:10"``) narrow what is checked."""
    infos, problems = scan(Path(path), model, list(revisions) if revisions else None)
    if steps is not None and infos:
        infos = select_checkpoints(infos, steps, path)
    return problems + check_checkpoints(infos, full=full)


def scan(
    path: Path, model: str | None = None, revisions: list[str] | None = None
) -> tuple[list[CheckpointInfo], list[Problem]]:
    """The series' readable-looking checkpoints (by step) and the problems met listing them.
    Unlike `list_checkpoints`, a faulty folder or revision is a problem, not an error."""
    if not path.is_dir():
        raise RunDirError(f"series not found: {path}")
    hub = hub_model_dir(path, model)
    if hub is not None:
        return _scan_hub(hub, revisions)
    if revisions:
        raise RunDirError(f"{path}: --revisions needs a Hugging Face hub cache (models--ORG--NAME)")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    subs = [root] if (root / "config.json").is_file() else sorted(root.iterdir())
    infos: dict[int, CheckpointInfo] = {}
    problems: list[Problem] = []
    for sub in subs:
        if not sub.is_dir() or sub.name.startswith("."):  # .tmp-* unfinished, .corrupt-*
            continue
        if not (sub / "config.json").is_file():
            if _CKPT_NAME.search(sub.name):
                problems.append(
                    Problem("missing", sub.name, "checkpoint folder without config.json")
                )
            continue
        meta = read_meta(sub)
        named = step_of_name(sub.name)
        step = meta.get("step", named)
        if not isinstance(step, int):
            problems.append(Problem("order", sub.name, f"no step in its name or {META_FILE}"))
            continue
        if step in infos:
            other = infos[step].path.name
            problems.append(Problem("order", sub.name, f"step {step} also in {other}"))
            continue
        infos[step] = CheckpointInfo(
            step=step,
            path=sub,
            tokens=float(meta.get("tokens", math.nan)),
            meta=meta,
        )
    if not infos and not problems:
        raise RunDirError(f"no checkpoints found in {path}")
    return [infos[s] for s in sorted(infos)], problems


def _scan_hub(hub: Path, revisions: list[str] | None) -> tuple[list[CheckpointInfo], list[Problem]]:
    refs = hub_refs(hub)
    problems = [
        Problem("missing", r, "revision not in the cache") for r in revisions or () if r not in refs
    ]
    wanted = [r for r in revisions if r in refs] if revisions else list(refs)
    infos: dict[int, CheckpointInfo] = {}
    for rev in sorted(wanted, key=lambda r: (step_of_name(r) or -1, r)):
        step = step_of_name(rev)
        if step is None:
            continue  # main and other names without a step are never analysed
        folder = hub / "snapshots" / refs[rev]
        if not (folder / "config.json").is_file():
            problems.append(Problem("missing", rev, f"snapshot {refs[rev][:12]} is not cached"))
            continue
        if step in infos:
            if infos[step].path != folder:
                first = infos[step].meta["revision"]
                problems.append(Problem("order", rev, f"step {step} also named by {first}"))
            continue
        infos[step] = CheckpointInfo(step=step, path=folder, meta={"revision": rev})
    return [infos[s] for s in sorted(infos)], problems


def check_checkpoints(infos: list[CheckpointInfo], full: bool = False) -> list[Problem]:
    """Problems of checkpoints already listed (by step): readable config and weights, recorded
    step against the name, token counts rising with the step, duplicate weights."""
    problems: list[Problem] = []
    hashes: dict[str, list[CheckpointInfo]] = {}
    prev: CheckpointInfo | None = None
    for info in infos:
        where = label(info)
        problems += _step_problems(info, where)
        if prev is not None and info.tokens < prev.tokens:  # NaN (not recorded) never compares
            problems.append(
                Problem(
                    "order",
                    where,
                    f"records {info.tokens:.0f} tokens at step {info.step}, fewer than "
                    f"{label(prev)}'s {prev.tokens:.0f} at step {prev.step}",
                )
            )
        if math.isfinite(info.tokens):
            prev = info
        try:
            json.loads((info.path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            problems.append(Problem("unreadable", where, f"config.json: {_first(exc)}"))
            continue
        try:
            digest = weights_hash(info.path, full=full)
        except RunDirError as exc:
            kind = "missing" if "no weight file" in str(exc) else "unreadable"
            problems.append(Problem(kind, where, str(exc)))
            continue
        hashes.setdefault(digest, []).append(info)
    how = "every byte" if full else "sampled bytes"
    for group in hashes.values():
        # the latest revision of a group is the reference: a faulty early branch serving
        # final-era weights (pythia#205) is the common case
        ref = group[-1]
        for info in group[:-1]:
            problems.append(
                Problem(
                    "duplicate",
                    label(info),
                    f"weights identical to {label(ref)}'s (step {ref.step}; hash of {how})",
                )
            )
    pos = {label(i): n for n, i in enumerate(infos)}
    return sorted(problems, key=lambda p: (pos.get(p.where, -1), p.kind))


def summary_line(problems: list[Problem], n_checked: int | None = None) -> str:
    """One line for `align`'s warning: the count by kind and the first problem."""
    kinds: dict[str, int] = {}
    for p in problems:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
    of = f" in {n_checked} checkpoints" if n_checked is not None else ""
    return f"series check: {len(problems)} problem(s){of} ({counts}); first: {problems[0]}"


def label(info: CheckpointInfo) -> str:
    """How a checkpoint is named to the user: its revision, else its folder."""
    return str(info.meta.get("revision") or info.path.name)


def _step_problems(info: CheckpointInfo, where: str) -> list[Problem]:
    out = []
    named = step_of_name(str(info.meta.get("revision") or info.path.name))
    if named is not None and named != info.step:
        out.append(
            Problem("order", where, f"named step {named} but {META_FILE} records {info.step}")
        )
    state = info.path / TRAINER_STATE
    if state.is_file():
        try:
            recorded = json.loads(state.read_text()).get("global_step")
        except (OSError, ValueError) as exc:
            out.append(Problem("unreadable", where, f"{TRAINER_STATE}: {_first(exc)}"))
            recorded = None
        if isinstance(recorded, int) and recorded != info.step:
            out.append(
                Problem("order", where, f"step {info.step} but {TRAINER_STATE} says {recorded}")
            )
    return out


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def weight_files(folder: Path) -> list[Path]:
    """The weight files a checkpoint folder loads from: safetensors first (as transformers)."""
    for pattern in (
        "model.safetensors",
        "model-*.safetensors",
        "pytorch_model.bin",
        "pytorch_model-*.bin",
    ):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def weights_hash(folder: Path, full: bool = False) -> str:
    """A hash of the checkpoint's tensors (names, dtypes, shapes, bytes): equal for equal
    weights whatever the file's metadata. Sampled bytes unless `full`; see the module doc."""
    files = weight_files(folder)
    if not files:
        raise RunDirError("no weight file (model.safetensors, pytorch_model.bin)")
    h = hashlib.blake2b(digest_size=20)
    for f in files:
        if not f.exists():  # a hub snapshot's link to a blob that is gone
            raise RunDirError(f"{f.name}: a link to a missing file")
        try:
            if f.suffix == ".safetensors":
                _hash_safetensors(f, h, full)
            else:
                _hash_torch(f, h, full)
        except (OSError, ValueError, RuntimeError, KeyError, struct.error) as exc:
            raise RunDirError(f"{f.name}: {_first(exc)}") from None
    return h.hexdigest()


def _spans(size: int, full: bool) -> list[tuple[int, int]]:
    """(offset, length) pieces of a tensor's `size` bytes that the hash reads."""
    if full or size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
        return [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)] or [(0, 0)]
    last = size - SAMPLE_BLOCK
    return [(last * i // (SAMPLE_BLOCKS - 1), SAMPLE_BLOCK) for i in range(SAMPLE_BLOCKS)]


def _hash_safetensors(f: Path, h: Any, full: bool) -> None:
    # the format: 8-byte little-endian header length, a JSON header naming each tensor's
    # dtype, shape and [begin, end) within the data that follows
    fd = os.open(f, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if n > size - 8:
            raise ValueError("header longer than the file")
        header = json.loads(os.pread(fd, n, 8))
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            t = header[name]
            begin, end = (int(x) for x in t["data_offsets"])
            if base + end > size or begin > end:
                raise ValueError(f"tensor {name} runs past the end of the file (cut short?)")
            h.update(f"{name}|{t['dtype']}|{t['shape']}|".encode())
            for off, length in _spans(end - begin, full):
                piece = os.pread(fd, length, base + begin + off)
                if len(piece) != length:
                    raise ValueError(f"tensor {name}: short read (file cut short?)")
                h.update(piece)
    finally:
        os.close(fd)


def _hash_torch(f: Path, h: Any, full: bool) -> None:
    import torch

    # mmap: only the sampled pages are read
    state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        for off, length in _spans(raw.size, full):
            h.update(raw[off : off + length].tobytes())
