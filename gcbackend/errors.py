"""The exceptions gcbackend raises.

Every error names the offending argument or parameter and says what to do. They form a
small hierarchy so callers can catch all of them at once::

    GradCheckError
    ├── InputError(ValueError)            bad params, grads, options
    │   └── InputTypeError(TypeError)     a value of the wrong type or dtype
    ├── CostError                          the user's cost failed or broke the contract
    ├── ClusterError                       a Dask cluster could not finish the check (client=)
    └── BackendUnavailableError(ImportError)  the backend cannot be used here
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ClusterError",
    "CostError",
    "GradCheckError",
    "InputError",
    "InputTypeError",
]


class GradCheckError(Exception):
    """Base class of every error raised by gcbackend."""


class InputError(GradCheckError, ValueError):
    """A parameter, gradient or option is invalid (the message names it and the fix)."""


class InputTypeError(InputError, TypeError):
    """A parameter, gradient or option has the wrong type or dtype."""


class CostError(GradCheckError):
    """The cost function raised, or returned something that breaks the cost contract.

    The original exception, if any, is chained as ``__cause__``.
    """


class ClusterError(GradCheckError):
    """The Dask cluster of ``client=`` could not finish the check, through no fault of the cost.

    The client was closed or lost its scheduler while the check ran, no worker was left, or
    a worker could not rebuild the inputs (a library missing there). A worker that dies
    every time it evaluates the same rows is the cost's doing: that is a CostError. The
    original exception is chained as ``__cause__``.
    """


class BackendUnavailableError(GradCheckError, ImportError):
    """The requested array backend is not installed or has no usable device."""
