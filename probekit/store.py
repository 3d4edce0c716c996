"""The analysis cube: RUN_DIR/analysis.zarr, one zarr group per metric family.

Each family (similarity, neurons, gradients, ...) is an xarray Dataset with a
`step` dimension and a `tokens` coordinate, readable with plain xarray:
``xr.open_zarr("runs/x/analysis.zarr", group="similarity")``.

A checkpoint's results are appended under a file lock: a step after every stored
one, with the stored variables and coordinates, extends the group's arrays (one
chunk per step: new chunk files and the arrays' metadata are written, nothing
of the earlier checkpoints), behind a journal that undoes a killed append.
Anything else (a replaced or earlier step, a new variable, other coordinates)
rewrites the family group into a temporary folder and swaps it in with renames.
A run killed at any moment therefore leaves every finished checkpoint readable,
and several processes (dask workers, torchrun ranks) can write their own steps.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from probekit.errors import RunDirError
from probekit.metrics import FAMILIES

STORE_VERSION = 1
STEP_CHUNK = 1 << 16  # steps per chunk of a step-only coordinate


def store_path(run_dir: Path) -> Path:
    return Path(run_dir) / "analysis.zarr"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    # the lock lives beside the store: zarr warns about foreign files inside it
    with open(path.parent / ".analysis.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _recover(path: Path, family: str) -> None:
    """Finish a swap that a killed process left half done."""
    old, cur = path / f".old-{family}", path / family
    if old.exists() and not cur.exists():
        old.rename(cur)
    elif old.exists():
        shutil.rmtree(old)
    tmp = path / f".tmp-{family}"
    if tmp.exists():
        shutil.rmtree(tmp)


def check_version(run_dir: Path) -> None:
    """Refuse a store written by an incompatible probekit, before anything is touched."""
    path = store_path(run_dir)
    if not (path / "zarr.json").is_file():
        return
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable store metadata ({exc})") from None
    version = attrs.get("probekit_store_version")
    if version != STORE_VERSION:
        raise RunDirError(
            f"{path}: written by an incompatible probekit (store version {version}, this "
            f"probekit reads {STORE_VERSION}); move it aside or use a new run directory"
        )


def _ensure_root(path: Path) -> None:
    if not (path / "zarr.json").is_file():
        root = zarr.open_group(str(path), mode="a", zarr_format=3)
        root.attrs["probekit_store_version"] = STORE_VERSION


def read_family(run_dir: Path, family: str) -> xr.Dataset | None:
    """One family's Dataset, loaded into memory, or None if it has never been written."""
    path = store_path(run_dir)
    check_version(run_dir)
    if (
        (path / f".old-{family}").exists()
        or (path / f".tmp-{family}").exists()
        or _journal(path, family).exists()
    ):
        with _locked(path):
            _recover(path, family)
            _undo_append(path, family)
    if not (path / family / "zarr.json").is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return xr.open_zarr(str(path), group=family, consolidated=False).load()
    except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise many kinds on a bad chunk
        raise DamagedFamily(family, path, exc) from None


class DamagedFamily(RunDirError):
    """A family group of the cube that no longer reads (a truncated or unreadable chunk)."""

    def __init__(self, family: str, path: Path, exc: Exception):
        self.family = family
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        rebuild = (
            f"probekit eval {path.parent} --recompute"
            if family == "perplexity"
            else f"probekit align {path.parent} --metrics {family} --recompute"
        )
        super().__init__(
            f"{path / family}: stored {family} results are damaged ({type(exc).__name__}: "
            f"{first}); rebuild them with `{rebuild}` (the other families are untouched)"
        )


def discard_family(run_dir: Path, family: str) -> None:
    """Remove one family's group (a damaged one, before a full recompute rebuilds it)."""
    path = store_path(run_dir)
    with _locked(path):
        if (path / family).exists():
            shutil.rmtree(path / family)
        _consolidate(path)


def stored_steps(run_dir: Path, family: str) -> list[int]:
    ds = read_family(run_dir, family)
    return [] if ds is None else [int(s) for s in ds["step"].values]


def _align_vars(a: xr.Dataset, b: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Give both datasets the same variables (NaN where one lacks them) so they concat."""
    for src, dst_name in ((a, "b"), (b, "a")):
        dst = b if dst_name == "b" else a
        for name, var in src.data_vars.items():
            if name not in dst.data_vars:
                shape = {d: (dst.sizes[d] if d in dst.sizes else var.sizes[d]) for d in var.dims}
                filler = xr.DataArray(
                    np.full(tuple(shape.values()), np.nan), dims=var.dims, attrs=var.attrs
                )
                dst = dst.assign({name: filler})
        if dst_name == "b":
            b = dst
        else:
            a = dst
    return a, b


def _to_zarr(ds: xr.Dataset, path: Path, group: str) -> None:
    ds = _storable(ds)
    # one chunk per step: appending the next checkpoint then writes new chunk files only. The
    # step-only coordinates (step, tokens: 8 bytes a checkpoint) are one chunk, read whole for
    # the index at every open; an append rewrites it (atomically) with one more value.
    encoding = {
        name: {"chunks": (STEP_CHUNK,) if var.dims == ("step",) else (1, *var.shape[1:])}
        for name, var in ds.variables.items()
        if var.dims and var.dims[0] == "step"
    }
    ds.to_zarr(
        str(path), group=group, mode="w", consolidated=False, zarr_format=3, encoding=encoding
    )


def _storable(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    for name, var in ds.variables.items():
        var.encoding.clear()
        if var.dtype.kind == "U":  # variable-length strings have a zarr v3 spec; fixed UTF-32 not
            ds[name] = var.astype(object)
    return ds


# Appending a checkpoint (`_append`) extends every step array of the group in place. Each file
# zarr writes is atomic (a temporary file renamed over the old one), but the arrays' metadata
# are several files: the journal beside the store records the group's step count before the
# append, and a process that finds it (a writer was killed) cuts every step array back to it.
def _journal(path: Path, family: str) -> Path:
    return path.parent / f".analysis.append-{family}.json"


def _undo_append(path: Path, family: str) -> None:
    """Cut a family group back to the steps it held before a killed append (under the lock)."""
    journal = _journal(path, family)
    if not journal.is_file():
        return
    try:
        n = int(json.loads(journal.read_text())["n_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        n = None  # torn while being written: nothing was appended yet
    if n is not None and (path / family / "zarr.json").is_file():
        group = zarr.open_group(str(path), path=family, mode="r+", zarr_format=3)
        for _, arr in group.arrays():
            names = arr.metadata.dimension_names or ()
            if names and names[0] == "step" and arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        _consolidate(path)
    journal.unlink()


def _appendable(old: xr.Dataset, ds: xr.Dataset) -> bool:
    """Whether `ds` (new steps) extends `old` as is: the same variables, dims, dtypes and
    non-step coordinates, every new step after every stored one."""
    if set(old.data_vars) != set(ds.data_vars) or set(old.coords) != set(ds.coords):
        return False
    if not old.sizes.get("step") or ds["step"].min() <= old["step"].max():
        return False
    for name, var in ds.variables.items():
        have = old.variables[name]
        if var.dims != have.dims or _kind(var.dtype) != _kind(have.dtype):
            return False
        if "step" in var.dims:
            if var.shape[1:] != have.shape[1:]:
                return False
        elif var.shape != have.shape or _listed(var.values) != _listed(have.values):
            return False
    return True


def _listed(values: np.ndarray) -> list:
    return [str(v) for v in np.asarray(values).ravel().tolist()]


def _kind(dtype: np.dtype) -> str:
    # strings are written as variable-length strings and read back as numpy's StringDType
    return "str" if dtype.kind in "UOTS" else dtype.kind


def _append(path: Path, family: str, ds: xr.Dataset, n_steps: int) -> None:
    """Extend the group by `ds`'s steps: new chunk files and the arrays' metadata only."""
    journal = _journal(path, family)
    tmp = journal.with_suffix(".tmp")
    tmp.write_text(json.dumps({"n_steps": int(n_steps)}))
    tmp.replace(journal)
    ds = _storable(ds.drop_vars([n for n, v in ds.variables.items() if "step" not in v.dims]))
    ds.to_zarr(str(path), group=family, append_dim="step", consolidated=False, zarr_format=3)
    _consolidate(path)
    journal.unlink()


def _stored_head(path: Path, family: str) -> xr.Dataset | None:
    """A family group opened lazily (metadata, coordinates): what `_appendable` compares."""
    if not (path / family / "zarr.json").is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(str(path), group=family, consolidated=False)


def _consolidate(path: Path) -> None:
    """Root-level consolidated metadata, so plain `xr.open_zarr(path, group=...)` is fast."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def write_steps(run_dir: Path, family: str, ds: xr.Dataset, attrs: dict | None = None) -> None:
    """Add (or replace) the steps in `ds` (which has a `step` dim) to a family group."""
    if family not in FAMILIES:
        raise ValueError(f"unknown metric family {family!r} (registered: {', '.join(FAMILIES)})")
    path = store_path(run_dir)
    check_version(run_dir)
    with _locked(path):
        _ensure_root(path)
        _recover(path, family)
        _undo_append(path, family)
        ds = ds.sortby("step")
        head = _stored_head(path, family)
        if head is not None and _appendable(head, ds):
            _append(path, family, ds.assign_attrs(attrs or {}), head.sizes["step"])
            return
        old = head.load() if head is not None else None
        if old is not None:
            old = old.sel(step=[s for s in old["step"].values if s not in set(ds["step"].values)])
            if old.sizes["step"]:
                old, ds = _align_vars(old, ds)
                ds = xr.concat([old, ds], dim="step", join="outer", combine_attrs="override")
        ds = ds.sortby("step")
        ds.attrs.update(attrs or {})
        tmp = path / f".tmp-{family}"
        _to_zarr(ds, path, f".tmp-{family}")
        cur, old_dir = path / family, path / f".old-{family}"
        if cur.exists():
            cur.rename(old_dir)
        tmp.rename(cur)
        if old_dir.exists():
            shutil.rmtree(old_dir)
        _consolidate(path)


def write_step(
    run_dir: Path,
    family: str,
    result: xr.Dataset,
    step: int,
    tokens: float,
    attrs: dict | None = None,
) -> None:
    """Store one checkpoint's results (a Dataset without a step dim)."""
    ds = result.expand_dims(step=[int(step)]).assign_coords(tokens=("step", [float(tokens)]))
    write_steps(run_dir, family, ds, attrs)


def families(run_dir: Path) -> list[str]:
    """Families stored in a run's cube: registered ones in registry order, then any other
    (written by a family registered in another process, e.g. a notebook's)."""
    path = store_path(run_dir)
    if not path.is_dir():
        return []
    names = {p.name.removeprefix(".old-") for p in path.iterdir() if p.is_dir()}
    stored = [
        n
        for n in names
        if not n.startswith(".")
        and ((path / n / "zarr.json").is_file() or (path / f".old-{n}").exists())
    ]
    order = list(FAMILIES)
    return sorted(stored, key=lambda n: (order.index(n) if n in order else len(order), n))


def open_cube(run_dir: Path) -> xr.Dataset:
    """Every stored metric of a run in one Dataset (outer join on `step`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    parts = [read_family(run_dir, f) for f in families(run_dir)]
    parts = [p for p in parts if p is not None]
    if not parts:
        raise RunDirError(
            f"{run_dir}: no analysis cube yet; run `probekit align {run_dir}` "
            f"(and `probekit eval {run_dir}`) first"
        )
    attrs: dict = {}
    for p in parts:
        attrs.update(p.attrs)
    merged = xr.merge(parts, join="outer", compat="override", combine_attrs="override")
    merged.attrs = attrs
    return merged
