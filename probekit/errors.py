"""Errors a user can cause: the CLI prints them as one line and exits non-zero."""


class ProbekitError(Exception):
    """Bad input or a state the user must fix; never a bug in probekit."""


class ConfigError(ProbekitError):
    """A config field is missing, malformed or out of range."""


class RunDirError(ProbekitError):
    """A run directory or checkpoint is missing, corrupt or mismatched."""


class MetricError(ProbekitError):
    """A metric was asked of a run that cannot have it, or is unknown."""
