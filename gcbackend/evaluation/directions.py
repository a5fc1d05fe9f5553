"""The fast screen's seeded unit directions, generated where they are used.

Direction j of tensor t is a unit Gaussian vector in Rⁿ drawn from its own generator
(``numpy.random.default_rng((seed, t, j))``): any direction is rebuilt from (seed, t, j)
alone, on any machine, in any order. So nothing of size k×n needs to be held: the plan draws
one direction at a time to form uᵀg, and a chunk of rows draws only the directions of its
rows (``Displacements.host_rows``). Where all k directions of a tensor are small
(``HELD_BYTES``), they are drawn once and held, and the evaluation gets an ordinary array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HELD_BYTES", "Directions", "Displacements"]

HELD_BYTES = 16 * 2**20
"""All of a tensor's directions (float64, on the host and as the backend copy) are held at
most this large, and at most a quarter of the memory budget; larger ones are drawn per chunk."""


def _generator(seed: tuple[int, ...]) -> Any:
    import numpy as np

    return np.random.default_rng(seed)


@dataclass
class Directions:
    """k seeded unit directions in Rⁿ for tensor number ``tensor`` (host float64)."""

    seed: int
    tensor: int
    count: int
    n: int
    _held: Any = field(default=None, repr=False, compare=False)

    def unit(self, j: int) -> Any:
        """Direction j, (n,): a Gaussian draw scaled to unit length (θ moves by h along it, as in
        a coordinate step, whatever n)."""
        if self._held is not None:
            return self._held[j]
        import numpy as np

        u = _generator((self.seed, self.tensor, int(j))).standard_normal(self.n)
        return u / np.linalg.norm(u)

    def hold(self) -> None:
        """Draw every direction once and keep them (only where they are small)."""
        import numpy as np

        if self._held is None:
            self._held = (
                np.stack([self.unit(j) for j in range(self.count)]) if self.count else np.zeros((0, self.n))
            )

    @property
    def held(self) -> bool:
        return self._held is not None

    def products(self, g: Any) -> Any:
        """uⱼᵀg for every j, (k,): one direction at a time (O(n) memory)."""
        import numpy as np

        return np.asarray([float(self.unit(j) @ g) for j in range(self.count)], dtype=np.float64)

    def displacements(self, picks: Any, steps: Any) -> Displacements:
        """Rows ``steps[i]·u_{picks[i]}``: the displacements of a request, not yet drawn."""
        return Displacements(self, picks, steps)


@dataclass
class Displacements:
    """(len(picks), n) displacements ``steps[i]·u_{picks[i]}``, drawn on demand: the
    ``directions`` of a ``Stencil`` where a tensor's directions are too large to hold.
    Picklable (a Dask worker draws its own chunk's rows)."""

    directions: Directions
    picks: Any
    steps: Any

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.picks.shape[0]), self.directions.n)

    def host_rows(self, index: Any) -> Any:
        """Displacements ``index`` (host ints into picks), (len(index), n) float64 host: the same
        operations as the held array ``units[picks] * steps[:, None]``, so bitwise its rows."""
        import numpy as np

        out = np.empty((int(index.shape[0]), self.directions.n))
        for row, i in enumerate(np.asarray(index).tolist()):
            out[row] = self.directions.unit(int(self.picks[i])) * self.steps[i]
        return out

    def drawn(self) -> Any:
        """All of them at once, (len(picks), n) host: for a compiled JAX program, which takes
        its rows' sources as one array."""
        import numpy as np

        return self.host_rows(np.arange(self.shape[0]))
