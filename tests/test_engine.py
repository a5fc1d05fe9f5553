"""engine: stacked equals loop within the rounding of the cost, at every chunk size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_on, host

import gcbackend as gc
from gcbackend import engine
from gcbackend.models import mlp
from gcbackend.params import Layout

SIZES = [
    ([4, 5, 3, 1], 3),  # the seed case's shape: 47 parameters, one stacked call
    ([6, 7, 1], 9),  # 57 parameters
    ([12, 10, 6, 1], 20),  # 207 parameters: per-tensor chunks
    ([30, 16, 1], 8),  # 513 parameters: several chunks for W1
]


def _numeric(backend, dims, m, **options):
    X, Y, params = mlp.random_case(dims, m, seed=len(dims) + m, xp=backend.xp, device=backend.device)
    xp = backend.xp
    layout = Layout.of(params)
    numeric = engine.central_differences(mlp.cost, params, (X, Y), layout=layout, epsilon=1e-7, xp=xp, **options)
    max_cost = float(host(mlp.cost(params, X, Y)))
    return numeric, max_cost, params


def _rounding_bound(max_cost: float, epsilon: float) -> float:
    # |stacked − loop| ≤ 4·eps·max|J| / ε: J⁺ and J⁻ may each round differently by up to
    # ~2 ulp when a batched GEMM sums in another order, and the quotient divides by 2ε.
    return 4 * np.finfo(np.float64).eps * max(abs(max_cost), 1.0) / epsilon


@pytest.mark.parametrize(("dims", "m"), SIZES)
def test_stacked_equals_loop(backend, dims, m):
    stacked, max_cost, params = _numeric(backend, dims, m)
    loop, _, _ = _numeric(backend, dims, m, mode="loop")
    bound = _rounding_bound(max_cost, 1e-7)
    for name in params:
        assert_on(stacked[name], backend)
        assert tuple(stacked[name].shape) == tuple(params[name].shape)
        assert np.max(np.abs(host(stacked[name]) - host(loop[name]))) <= bound, name


@pytest.mark.parametrize("budget_rows", [1, 3, 7, None])
def test_chunk_boundaries_do_not_change_the_answer(backend, budget_rows):
    dims, m = [9, 8, 1], 5  # W1 has 72 elements: 144 rows, split unevenly by 7
    whole, max_cost, params = _numeric(backend, dims, m, memory_budget=10**9)
    budget = None if budget_rows is None else budget_rows * 72 * 8  # rows of W1 per call
    chunked, _, _ = _numeric(backend, dims, m, **({} if budget is None else {"memory_budget": budget}))
    bound = _rounding_bound(max_cost, 1e-7)
    for name in params:
        assert np.max(np.abs(host(chunked[name]) - host(whole[name]))) <= bound


def test_one_row_chunks_match_loop_bitwise_on_numpy():
    """One-row chunks and the loop evaluate the same floating-point operations on NumPy."""
    X, Y, params = mlp.seed_case()
    layout = Layout.of(params)
    one_row = engine.central_differences(
        mlp.cost, params, (X, Y), layout=layout, epsilon=1e-7, xp=gc.backends.resolve("numpy", []).xp,
        memory_budget=8 * 20,
    )
    loop = engine.central_differences(
        mlp.cost, params, (X, Y), layout=layout, epsilon=1e-7, xp=gc.backends.resolve("numpy", []).xp,
        mode="loop",
    )
    for name in params:
        assert host(one_row[name]).tobytes() == host(loop[name]).tobytes(), name


def test_rows_are_the_notebooks_perturbed_vectors(backend):
    """Every perturbed parameter set equals θ with exactly one element moved by exactly ±ε."""
    xp = backend.xp
    X, Y, params = mlp.seed_case(xp=xp, device=backend.device)
    seen = []

    def recording_cost(p, X, Y):
        seen.append({k: host(v) for k, v in p.items()})
        return mlp.cost(p, X, Y)

    engine.central_differences(
        recording_cost, params, (X, Y), layout=Layout.of(params), epsilon=1e-7, xp=xp, memory_budget=8 * 20 * 7
    )
    base = {k: host(v) for k, v in params.items()}
    rows = []
    for call in seen:
        batch = max(v.shape[0] for k, v in call.items() if v.ndim == base[k].ndim + 1)
        for b in range(batch):
            rows.append({k: (v[b] if v.ndim == base[k].ndim + 1 else v) for k, v in call.items()})
    assert len(rows) == 2 * 47
    plus_minus = set()
    for row in rows:
        moved = [(k, idx) for k in base for idx in zip(*np.nonzero(row[k] != base[k]))]
        assert len(moved) == 1
        k, idx = moved[0]
        delta = row[k][idx] - base[k][idx]
        expected_plus, expected_minus = base[k][idx] + 1e-7, base[k][idx] - 1e-7
        assert row[k][idx] in (expected_plus, expected_minus)
        plus_minus.add((k, tuple(int(i) for i in idx), math.copysign(1, delta)))
    assert len(plus_minus) == 2 * 47


def test_chunk_rows_follow_the_budget():
    assert engine.chunk_rows(1000, 10, 8, 800, "W") == 10
    assert engine.chunk_rows(1000, 10, 8, 10**9, "W") == engine.MAX_CHUNK_ROWS
    assert engine.chunk_rows(5, 10, 8, 10**9, "W") == 5
    # A large tensor: as many copies as fit CACHE_BYTES, but never fewer than MIN_CHUNK_ROWS.
    big = engine.CACHE_BYTES // (8 * 4)  # 4 copies of it fit
    assert engine.chunk_rows(1000, big, 8, 10**12, "W") == engine.MIN_CHUNK_ROWS
    assert engine.chunk_rows(1000, 32768, 8, 10**12, "W") == engine.CACHE_BYTES // (32768 * 8)
    assert engine.chunk_rows(1000, big, 8, 2 * 8 * big, "W") == 2  # the memory budget still rules
    with pytest.raises(gc.InputError, match=r"memory_budget=79 .* 'W'.* at least memory_budget=80"):
        engine.chunk_rows(1000, 10, 8, 79, "W")


def test_stacked_call_count_is_bounded(backend):
    xp = backend.xp
    X, Y, params = mlp.random_case([20, 10, 1], 4, seed=1, xp=xp, device=backend.device)
    calls = []

    def counting_cost(p, X, Y):
        calls.append(1)
        return mlp.cost(p, X, Y)

    n = {k: math.prod(v.shape) for k, v in params.items()}
    budget = 50 * 8 * 200  # 50 rows of a 200-element tensor
    engine.central_differences(
        counting_cost, params, (X, Y), layout=Layout.of(params), epsilon=1e-7, xp=xp, memory_budget=budget
    )
    expected = sum(math.ceil(2 * size / engine.chunk_rows(2 * size, size, 8, budget, k)) for k, size in n.items())
    assert expected == sum(math.ceil(2 * size / min(64, budget // (8 * size))) for size in n.values())
    assert len(calls) == expected


@pytest.mark.parametrize(
    ("dims", "m", "budget"), [([4, 5, 3, 1], 3, None), ([12, 10, 6, 1], 20, 40 * 120 * 8)]
)
def test_a_runner_gets_every_tensors_chunks_at_once_and_changes_no_bit(backend, dims, m, budget):
    # The seam gcbackend.distributed plugs into: a runner that evaluates each chunk with
    # evaluate_chunk (as a worker does) must reproduce the local pass bit for bit.
    X, Y, params = mlp.random_case(dims, m, seed=3, xp=backend.xp, device=backend.device)
    layout, xp = Layout.of(params), backend.xp
    calls, rows_done = [], []

    def runner(stencil, chunks, progress):
        calls.append(list(chunks))
        out = [engine.evaluate_chunk(stencil, chunk, xp=xp) for chunk in chunks]
        progress(sum(stop - start for _, start, stop in chunks))
        return out

    options = dict(layout=layout, epsilon=1e-7, xp=xp)
    if budget is not None:
        options["memory_budget"] = budget  # 40 rows of W1 (120 elements) per call
    local = engine.central_differences(mlp.cost, params, (X, Y), **options)
    remote = engine.central_differences(
        mlp.cost, params, (X, Y), runner=runner, progress=rows_done.append, **options
    )
    assert len(calls) == 1  # one hand-over for the whole check, not one per tensor
    tensors = [tensor for tensor, _, _ in calls[0]]
    if budget is None:
        assert calls[0] == [(None, 0, 2 * layout.size)]  # a small θ: one call, every tensor batched
    else:
        assert set(tensors) == set(params) and tensors.count("W1") == 6  # 240 rows of W1 by 40
    assert sum(rows_done) == 2 * layout.size
    for name in params:
        assert_on(remote[name], backend)
        assert host(remote[name]).tobytes() == host(local[name]).tobytes(), name
