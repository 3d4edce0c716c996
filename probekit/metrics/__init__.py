"""The metric families and their one registry.

Every family lives in its own module and is registered here; the store, the CLI help, the
driver and the report read their lists of families and variables from this registry alone.
A new family is one module (or one class in a notebook) and one `register(MyFamily())`.
"""

from __future__ import annotations

from probekit.errors import MetricError
from probekit.metrics.ablation import Ablation
from probekit.metrics.base import (
    Accumulator,
    CheckpointContext,
    Family,
    Needs,
    PairBatch,
    Variable,
)
from probekit.metrics.calibration import Calibrated
from probekit.metrics.efficiency import Efficiency
from probekit.metrics.embeddings import Embeddings
from probekit.metrics.features import Features
from probekit.metrics.gradients import Gradients
from probekit.metrics.lens import Lens
from probekit.metrics.neurons import Neurons
from probekit.metrics.patching import Patching
from probekit.metrics.perplexity import Perplexity
from probekit.metrics.probes import Probes
from probekit.metrics.similarity import Similarity
from probekit.metrics.tuned_lens import TunedLens

__all__ = [
    "Accumulator",
    "CheckpointContext",
    "Family",
    "Needs",
    "PairBatch",
    "Variable",
    "FAMILIES",
    "register",
    "family_of",
    "families_for",
    "resolve",
    "load_entry_points",
    "ENTRY_POINT_GROUP",
]

FAMILIES: dict[str, Family] = {}
VARIANTS = ("_baseline", "_lo", "_hi")  # derived variables a family may add to its own


def register(family: Family) -> Family:
    """Add a family (or replace one of the same name); returns it."""
    if not getattr(family, "name", "") or not family.name.isidentifier():
        raise MetricError(f"a metric family needs an identifier as name, got {family!r}")
    FAMILIES[family.name] = family
    return family


for _family in (
    Similarity(),
    Neurons(),
    Gradients(),
    Embeddings(),
    Probes(),
    Perplexity(),
    Efficiency(),
    Lens(),
    Patching(),
    Ablation(),
    TunedLens(),
    Features(),
    Calibrated(),
):
    register(_family)


ENTRY_POINT_GROUP = "probekit.families"


def load_entry_points() -> list[str]:
    """Register the families other packages publish under the ``probekit.families`` entry-point
    group (as xarray finds its backends): each entry point names a Family subclass or instance.
    Returns their names; one that cannot be loaded is a one-line warning, not a failure."""
    import warnings
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            family = obj() if isinstance(obj, type) else obj
            if not isinstance(family, Family):
                raise TypeError(f"{ep.value} is not a probekit Family")
            names.append(register(family).name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break probekit
            warnings.warn(
                f"probekit: family entry point {ep.name!r} not loaded ({type(exc).__name__}: "
                f"{exc})",
                stacklevel=2,
            )
    return names


load_entry_points()


def families_for(command: str) -> list[Family]:
    """The families a command computes by default, in registry order."""
    return [f for f in FAMILIES.values() if f.command == command]


def family_of(variable: str) -> Family | None:
    """The family that writes a variable (its `_baseline`/`_lo`/`_hi` variants included)."""
    for suffix in ("",) + VARIANTS:
        for fam in FAMILIES.values():
            if suffix and not variable.endswith(suffix):
                continue
            root = variable[: -len(suffix)] if suffix else variable
            if any(v.name == root for v in fam.variables):
                return fam
    return None


def resolve(names: str | list[str] | tuple[str, ...] | None, command: str) -> list[Family]:
    """Family or variable names (or 'all': the command's default families) -> families, in
    registry order. Unknown names are one-line errors listing the known ones."""
    if names is None or names == "all" or list(names) == ["all"]:
        return families_for(command)
    items = names.split(",") if isinstance(names, str) else list(names)
    chosen: set[str] = set()
    for name in filter(None, (n.strip() for n in items)):
        if name == "all":
            chosen |= {f.name for f in families_for(command)}
            continue
        fam = FAMILIES.get(name) or family_of(name)
        if fam is None or fam.command == "teff":
            known = [f.name for f in FAMILIES.values() if f.command != "teff"]
            known += [v.name for f in FAMILIES.values() if f.command != "teff" for v in f.variables]
            raise MetricError(f"unknown metric {name!r} (known: {', '.join(known + ['all'])})")
        chosen.add(fam.name)
    return [f for f in FAMILIES.values() if f.name in chosen]


def describe(command: str = "align") -> str:
    """One line per family: its name and variables (the CLI help's list)."""
    return "; ".join(
        f"{f.name} ({', '.join(v.name for v in f.variables)})" for f in families_for(command)
    )
