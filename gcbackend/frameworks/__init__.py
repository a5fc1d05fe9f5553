"""check_function, check_module, check_in_place: check what users already have.

Three thin entry points over ``check``. Each builds a cost, its parameters and their
gradients from what the user holds, and hands them to ``check``; none evaluates or judges
anything itself.

* ``check_function(fn, *inputs)``: the backward pass of a PyTorch or JAX function (a custom
  ``torch.autograd.Function``'s ``apply``, a ``jax.custom_vjp``, anything built from tensors),
  through J = Σ over outputs of ⟨out, dout⟩ for seeded cotangents ``dout``: the gradients are
  the framework's own vector-Jacobian product at the inputs as given, so a float32 or float16
  backward is judged to its own precision while J is evaluated in float64.
* ``check_module(module, *inputs)``: a ``torch.nn.Module``'s parameters, evaluated through
  ``torch.func.functional_call`` so the module is never modified.
* ``check_in_place(loss, params, grads, *args)``: a cost that reads its parameters from where
  they live (a CS231n ``net.loss(X, y)`` reading ``net.params``): each perturbation is written
  into those arrays and restored.

PyTorch and JAX are imported only when an entry point needs them.
"""

from .function import JVP_DIRECTIONS, check_function, jvp_name
from .in_place import check_in_place
from .module import check_module

__all__ = ["JVP_DIRECTIONS", "check_function", "check_in_place", "check_module", "jvp_name"]
