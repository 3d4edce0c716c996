"""Compatibility: `make_report` now lives in probekit.report.make (the report's entry point).

Kept importable from here until probekit/__init__.py and the CLI import it from
probekit.report.
"""

from probekit.report.make import make_report

__all__ = ["make_report"]
