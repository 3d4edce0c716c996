"""probekit: how language models come to share computation across languages, over training.

The public API (what the CLI and the report call too)::

    import probekit
    probekit.train("examples/clone_90_10.toml", "runs/clone_90_10")
    cube = probekit.align("runs/clone_90_10")            # xarray.Dataset
    probekit.evaluate("runs/clone_90_10")                # per-language perplexity
    probekit.open_cube("runs/clone_90_10")               # every stored metric
    probekit.make_report(["runs/clone_90_10"], "report")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_API = {
    "train": "probekit.training",
    "align": "probekit.analysis",
    "AlignOptions": "probekit.analysis",
    "open_cube": "probekit.store",
    "evaluate": "probekit.evaluation",
    "teff_table": "probekit.evaluation",
    "token_efficiency": "probekit.evaluation",
    "run_sweep": "probekit.sweep",
    "make_report": "probekit.report",
    "run_demo": "probekit.demos",
    "load_config": "probekit.config",
    "load_run_data": "probekit.data",
    "list_checkpoints": "probekit.checkpoints",
    "load_checkpoint": "probekit.checkpoints",
    "check_series": "probekit.series_check",
}

__all__ = list(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `probekit --help` should not pay for importing torch and transformers
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")
