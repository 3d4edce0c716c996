"""Which checkpoints of a series to analyse: a list of steps, or a sample of the series.

One syntax, accepted by `--steps` and `--revisions` on the command line and by `steps=` in
Python (`probekit.align(run, steps="log:16")`):

- ``every:N``          the first checkpoint, every Nth after it (by position), and the last;
- ``log:K``            up to K checkpoints log-spaced in step between the first and the last
                       (each target step takes its nearest checkpoint; step 0, if the series
                       has it, is the first; duplicates collapse, so a dense start gives fewer);
- ``range:A:B[:S]``    the checkpoints with A <= step <= B (and, with S, step - A a multiple
                       of S).

Anything else is a comma-separated list of step numbers. A malformed sample is a one-line
`OptionError`; a sample that selects nothing is a one-line `RunDirError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from probekit.errors import RunDirError
from probekit.options import OptionError

FORMS = "every:N, log:K, range:A:B[:S]"
_KINDS = {"every": (1, 1), "log": (1, 1), "range": (2, 3)}


@dataclass(frozen=True)
class Sample:
    """A parsed sample: `kind` (every | log | range) and its integer arguments."""

    kind: str
    args: tuple[int, ...]

    def __str__(self) -> str:
        return ":".join([self.kind, *map(str, self.args)])

    def pick(self, steps: list[int]) -> list[int]:
        """The sampled steps of `steps` (sorted, distinct), in order."""
        if not steps:
            return []
        if self.kind == "every":
            n = self.args[0]
            idx = sorted(set(range(0, len(steps), n)) | {len(steps) - 1})
            return [steps[i] for i in idx]
        if self.kind == "log":
            return _log_pick(steps, self.args[0])
        lo, hi = self.args[0], self.args[1]
        every = self.args[2] if len(self.args) > 2 else 1
        return [s for s in steps if lo <= s <= hi and (s - lo) % every == 0]


def is_sample(spec: object) -> bool:
    """Whether `spec` is written as a sample (KIND:...), as opposed to a list of steps."""
    return isinstance(spec, str | Sample) and (isinstance(spec, Sample) or ":" in spec)


def parse_sample(spec: str, flag: str = "--steps") -> Sample:
    """`every:N`, `log:K` or `range:A:B[:S]` -> a Sample; anything else is an OptionError."""
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in _KINDS:
        raise OptionError(f"{flag}: unknown sample {spec!r} (expected {FORMS}, or steps a,b,c)")
    parts = rest.split(":") if rest else []
    lo, hi = _KINDS[kind]
    if not lo <= len(parts) <= hi or not all(re.fullmatch(r"\s*\d+\s*", p) for p in parts):
        want = {"every": "every:N", "log": "log:K", "range": "range:A:B[:S]"}[kind]
        raise OptionError(f"{flag}: expected {want} with non-negative integers, got {spec!r}")
    args = tuple(int(p) for p in parts)
    if kind == "every" and args[0] < 1:
        raise OptionError(f"{flag}: every:N needs N >= 1, got {spec!r}")
    if kind == "log" and args[0] < 2:
        raise OptionError(f"{flag}: log:K needs K >= 2, got {spec!r}")
    if kind == "range":
        if args[0] > args[1]:
            raise OptionError(f"{flag}: range:A:B needs A <= B, got {spec!r}")
        if len(args) > 2 and args[2] < 1:
            raise OptionError(f"{flag}: range:A:B:S needs S >= 1, got {spec!r}")
    return Sample(kind, args)


def parse_steps(spec: str | None, flag: str = "--steps") -> list[int] | Sample | None:
    """A `--steps` / sampled `--revisions` value: None (all), a Sample, or step numbers."""
    if spec is None or not spec.strip() or spec.strip() == "all":
        return None
    if is_sample(spec):
        return parse_sample(spec, flag)
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise OptionError(
            f"{flag}: expected comma-separated step numbers or a sample ({FORMS}), got {spec!r}"
        ) from None


def sample_steps(
    have: list[int], steps: list[int] | str | Sample | None, where: object = "series"
) -> list[int] | None:
    """The steps `steps` selects among `have` (None: all); a sample that selects nothing is an
    error. Lists of step numbers are returned as given (the caller checks they exist)."""
    if steps is None or (isinstance(steps, str) and steps.strip() in ("", "all")):
        return None
    if isinstance(steps, str):
        steps = parse_steps(steps)
    if not isinstance(steps, Sample):
        return list(steps)
    picked = steps.pick(sorted(set(have)))
    if not picked:
        raise RunDirError(
            f"{where}: sample {steps} selects no checkpoint (steps {min(have)}..{max(have)})"
            if have
            else f"{where}: no checkpoints"
        )
    return picked


def _log_pick(steps: list[int], k: int) -> list[int]:
    # log(step + 1) keeps step 0 on the scale; each target takes its nearest checkpoint
    lo, hi = math.log1p(steps[0]), math.log1p(steps[-1])
    keys = [math.log1p(s) for s in steps]
    out: list[int] = []
    for i in range(k):
        target = lo + (hi - lo) * i / (k - 1)
        j = min(range(len(steps)), key=lambda j: (abs(keys[j] - target), j))
        if steps[j] not in out:
            out.append(steps[j])
    return sorted(out)
