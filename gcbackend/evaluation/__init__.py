"""The evaluation: the cost at θ + D for many displacement rows D, by the fastest path
proved right for this cost.

Rows are grouped by the parameter tensor they perturb (``rows``). Each group is evaluated
by one of three paths, chosen once per tensor per check (``paths.choose_path``) and
remembered in a ``paths`` mapping for every later round (refinement, every chunk, every
worker):

* **broadcast** — a chunk of B rows becomes ONE cost call in which that tensor carries a
  leading batch axis, shape (B, *shape), and every other tensor is passed unbatched, so
  broadcasting shares it: nothing of size (2N, N) is built, memory is bounded by the budget;
* **vmap** — PyTorch's ``torch.func.vmap`` or JAX's ``jax.jit(jax.vmap(...))`` of the cost
  written for one point, mapped over the chunk's rows (``vmap``);
* **loop** — one row per call (the notebook's algorithm) in one reused vector, one element
  perturbed in place per row (``calls``).

Modules, each importing only those above it: ``chunks`` (how many rows per call), ``rows``
(the rows and their groups), ``calls`` (one call of the cost, J(θ), the loop), ``vmap``,
``paths`` (choosing and verifying a path), ``passes`` (``stencil_costs``: a whole pass),
``runners`` (threads; ``gcbackend.distributed`` for Dask); ``limits`` (process-wide settings
held while evaluating: BLAS and PyTorch threads) sits beside them. The evaluation knows nothing of
models or of checking; it sees a cost, arrays and rows.
"""

from __future__ import annotations

from .calls import contract, evaluate_center
from .chunks import (
    CACHE_BYTES,
    DEFAULT_MEMORY_BUDGET,
    MAX_CHUNK_ROWS,
    MIN_CHUNK_ROWS,
    ROW_FOOTPRINT,
    TUNE_MIN_ROWS,
    TUNE_SIZES,
    VMAP_ROWS,
    WHOLE_ROWS,
    chunk_bounds,
    chunk_rows,
    timed_on_host,
    tuned_sizes,
)
from .passes import central_differences, evaluate_chunk, evaluate_rows, stencil_costs
from .paths import AGREEMENT_ULPS, MODES, Path, choose_path, path_of
from .rows import Chunk, RowGroup, Stencil, coordinate_rows, direction_rows, row_group
from .runners import Runner, ThreadRunner, worker_count
from .vmap import can_vmap

__all__ = [
    "AGREEMENT_ULPS",
    "CACHE_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ROWS",
    "MODES",
    "ROW_FOOTPRINT",
    "TUNE_MIN_ROWS",
    "TUNE_SIZES",
    "VMAP_ROWS",
    "WHOLE_ROWS",
    "Chunk",
    "Path",
    "RowGroup",
    "Runner",
    "Stencil",
    "ThreadRunner",
    "can_vmap",
    "central_differences",
    "choose_path",
    "chunk_bounds",
    "chunk_rows",
    "contract",
    "coordinate_rows",
    "direction_rows",
    "evaluate_center",
    "evaluate_chunk",
    "evaluate_rows",
    "path_of",
    "row_group",
    "stencil_costs",
    "timed_on_host",
    "tuned_sizes",
    "worker_count",
]
