"""gcbackend: prove hand-written backpropagation right, on CPU or GPU.

``check(cost, params, grads, *args)`` compares the gradients a backward pass returned with
central finite differences of the cost, evaluated in stacked batches through any array-API
library (NumPy, CuPy, PyTorch, JAX, array-api-strict, Dask), and reports which parameter is
wrong, where, and by how much. ``check_layer(forward, backward, *inputs)`` checks one
layer's backward pass (J = Σ out·dout for a seeded random dout); ``check_function``,
``check_module`` and ``check_in_place`` check a PyTorch/JAX function's own backward, a
``torch.nn.Module``'s parameters, and a model object that reads its parameters in place.
"""

from . import models, testing
from .backends import BACKEND_NAMES
from .check import NOTEBOOK, check
from .errors import (
    BackendUnavailableError,
    ClusterError,
    CostError,
    GradCheckError,
    InputError,
    InputTypeError,
)
from .frameworks import check_function, check_in_place, check_module
from .layer import check_layer
from .report import ElementError, ParameterResult, Report

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "NOTEBOOK",
    "BackendUnavailableError",
    "ClusterError",
    "CostError",
    "ElementError",
    "GradCheckError",
    "InputError",
    "InputTypeError",
    "ParameterResult",
    "Report",
    "check",
    "check_function",
    "check_in_place",
    "check_layer",
    "check_module",
    "models",
    "testing",
]
