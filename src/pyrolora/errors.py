"""The package's error hierarchy.

Every error pyrolora raises on purpose derives from :class:`PyroloraError`, so callers can catch the library's
own failures in one ``except`` clause while programming mistakes (``TypeError`` from a wrong call, say) still
surface as themselves. Each subclass also derives from the closest built-in exception so that code written
against ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "DistributedError",
    "DivergenceError",
    "PyroloraError",
    "RunFolderError",
    "SWAGWarning",
    "TargetError",
    "TruncationWarning",
]


class PyroloraError(Exception):
    """Base class of every error raised by pyrolora."""


class ConfigError(PyroloraError, ValueError):
    """A configuration value is invalid: unknown key, wrong type or impossible value."""


class TargetError(PyroloraError, ValueError):
    """Adapter injection failed: no module matched, a rank is too large or a layer type is unsupported."""


class DataError(PyroloraError, ValueError):
    """A dataset is empty, malformed or inconsistent with its task description."""


class DivergenceError(PyroloraError, FloatingPointError):
    """Training produced a non-finite loss or gradient."""


class RunFolderError(PyroloraError, OSError):
    """A saved run folder is missing, incomplete, corrupt or does not match the model it is loaded into."""


class TruncationWarning(UserWarning):
    """Inputs longer than the token limit were truncated (issued once per dataset, with the count)."""


class SWAGWarning(UserWarning):
    """SWAG collected too few iterates for a covariance (fewer than 2): its posterior is nearly a point mass."""


class DistributedError(PyroloraError, RuntimeError):
    """A process of a distributed job failed, or the processes disagree (different data or models)."""
