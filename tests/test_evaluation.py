"""evaluation: stacked equals loop within the rounding of the cost, at every chunk size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_on, host
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gcbackend as gc
from gcbackend import evaluation
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
    numeric = evaluation.central_differences(
        mlp.cost, params, (X, Y), layout=layout, epsilon=1e-7, xp=xp, **options
    )
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
    options = dict(layout=layout, epsilon=1e-7, xp=gc.backends.resolve("numpy", []).xp)
    one_row = evaluation.central_differences(mlp.cost, params, (X, Y), memory_budget=8 * 20, **options)
    loop = evaluation.central_differences(mlp.cost, params, (X, Y), mode="loop", **options)
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

    evaluation.central_differences(
        recording_cost,
        params,
        (X, Y),
        layout=Layout.of(params),
        epsilon=1e-7,
        xp=xp,
        memory_budget=8 * 20 * 7 * evaluation.ROW_FOOTPRINT,
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
    F = evaluation.ROW_FOOTPRINT  # row-sized arrays the check holds per row of a call
    assert evaluation.chunk_rows(1000, 10, 8, 800 * F, "W") == 10
    assert evaluation.chunk_rows(1000, 10, 8, 800, "W") == 10 // F  # 10 copies: 10 / F rows
    assert evaluation.chunk_rows(1000, 10, 8, 80, "W") == 1  # one copy: a row at a time
    assert evaluation.chunk_rows(1000, 10, 8, 10**9, "W") == evaluation.MAX_CHUNK_ROWS
    assert evaluation.chunk_rows(5, 10, 8, 10**9, "W") == 5
    # A large tensor: as many copies as fit CACHE_BYTES, but never fewer than MIN_CHUNK_ROWS.
    big = evaluation.CACHE_BYTES // (8 * 4)  # 4 copies of it fit
    assert evaluation.chunk_rows(1000, big, 8, 10**12, "W") == evaluation.MIN_CHUNK_ROWS
    assert evaluation.chunk_rows(1000, 32768, 8, 10**12, "W") == evaluation.CACHE_BYTES // (32768 * 8)
    assert evaluation.chunk_rows(1000, big, 8, 2 * 8 * big * F, "W") == 2  # the memory budget still rules
    assert evaluation.chunks.vmap_rows(big, 8, 3 * 8 * big * F) == 3
    with pytest.raises(gc.InputError, match=r"memory_budget=79 .* 'W'.* at least memory_budget=80"):
        evaluation.chunk_rows(1000, 10, 8, 79, "W")


def test_stacked_call_count_is_bounded(backend):
    xp = backend.xp
    X, Y, params = mlp.random_case([20, 10, 1], 4, seed=1, xp=xp, device=backend.device)
    calls = []

    def counting_cost(p, X, Y):
        calls.append(1)
        return mlp.cost(p, X, Y)

    n = {k: math.prod(v.shape) for k, v in params.items()}
    F = evaluation.ROW_FOOTPRINT
    budget = 50 * 8 * 200 * F  # 50 rows of a 200-element tensor
    evaluation.central_differences(
        counting_cost, params, (X, Y), layout=Layout.of(params), epsilon=1e-7, xp=xp, memory_budget=budget
    )
    expected = sum(
        math.ceil(2 * size / evaluation.chunk_rows(2 * size, size, 8, budget, k)) for k, size in n.items()
    )
    assert expected == sum(math.ceil(2 * size / min(64, budget // (F * 8 * size))) for size in n.values())
    assert len(calls) == expected


@pytest.mark.parametrize(
    ("dims", "m", "budget"),
    [([4, 5, 3, 1], 3, None), ([12, 10, 6, 1], 20, 40 * 120 * 8 * evaluation.ROW_FOOTPRINT)],
)
def test_a_runner_gets_every_tensors_chunks_at_once_and_changes_no_bit(backend, dims, m, budget):
    # The seam gcbackend.distributed plugs into: a runner that evaluates each chunk with
    # evaluate_chunk (as a worker does) must reproduce the local pass bit for bit.
    X, Y, params = mlp.random_case(dims, m, seed=3, xp=backend.xp, device=backend.device)
    layout, xp = Layout.of(params), backend.xp
    calls, rows_done = [], []

    def runner(stencil, chunks, progress):
        calls.append(list(chunks))
        out = [evaluation.evaluate_chunk(stencil, chunk, xp=xp) for chunk in chunks]
        progress(sum(stop - start for _, start, stop in chunks))
        return out

    options = dict(layout=layout, epsilon=1e-7, xp=xp)
    if budget is not None:
        options["memory_budget"] = budget  # 40 rows of W1 (120 elements) per call
    local = evaluation.central_differences(mlp.cost, params, (X, Y), **options)
    remote = evaluation.central_differences(
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


def _tuned_case(backend, size=1500):
    """A quadratic J(w) = Σ c·w² over 2·size ≥ TUNE_MIN_ROWS rows: big enough to be tuned."""
    assert 2 * size >= evaluation.TUNE_MIN_ROWS
    xp = backend.xp
    host_w = np.linspace(-1.0, 1.0, size)
    w = xp.asarray(host_w, dtype=xp.float64, device=backend.device)
    c = xp.asarray(np.linspace(0.5, 2.0, size), dtype=xp.float64, device=backend.device)
    return {"w": w}, c, host_w


def test_measured_chunk_sizes_stay_in_the_budget_and_change_no_bit(backend):
    # On NumPy and torch CPU the rows per call are measured (evaluation.tuned_sizes); on every
    # backend the answer must be the one of fixed chunks, bit for bit (each row's cost is
    # computed on its own), and no call may hold more rows than the memory budget allows.
    xp = backend.xp
    params, c, _ = _tuned_case(backend)
    sizes = []

    def cost(p, c):
        sizes.append(p["w"].shape[0] if p["w"].ndim == 2 else 1)
        return xp.sum(c * p["w"] * p["w"], axis=-1)

    layout = Layout.of(params)
    budget = 40 * 1500 * 8 * evaluation.ROW_FOOTPRINT  # 40 rows of w per call, at most
    tuned = evaluation.central_differences(
        cost, params, (c,), layout=layout, epsilon=1e-6, xp=xp, memory_budget=budget
    )
    assert sum(sizes) == 3000 and max(sizes) <= 40
    if evaluation.timed_on_host(xp, params["w"]):
        # The trials first: TUNE_SIZES in order, two calls each, within the budget (which
        # sizes are tried past the first two depends on the clock); then the fastest of them.
        tried = []
        while (
            len(tried) < len(evaluation.TUNE_SIZES)
            and sizes[2 * len(tried)] == evaluation.TUNE_SIZES[len(tried)]
        ):
            assert sizes[2 * len(tried) + 1] == evaluation.TUNE_SIZES[len(tried)]
            tried.append(evaluation.TUNE_SIZES[len(tried)])
        assert tried[:2] == [4, 8] and max(tried) <= 40
        rest = sizes[2 * len(tried) : -1]  # the last call holds what is left
        assert len(set(rest)) == 1 and rest[0] in tried
    fixed_sizes = list(sizes)
    sizes.clear()
    fixed = evaluation.central_differences(
        cost, params, (c,), layout=layout, epsilon=1e-6, xp=xp, memory_budget=budget, mode="loop"
    )
    assert len(sizes) == 3000  # the loop: one row per call
    assert host(tuned["w"]).tobytes() == host(fixed["w"]).tobytes(), fixed_sizes[:20]


def test_a_cost_returning_a_view_of_its_inputs_is_not_overwritten(backend):
    # Rows are written into the previous call's buffer where the library allows it; a cost
    # that returns a view of its inputs (here J(w) = w_0) must still get its own costs.
    params, _, _ = _tuned_case(backend)
    layout = Layout.of(params)
    numeric = evaluation.central_differences(
        lambda p: p["w"][..., 0], params, (), layout=layout, epsilon=1e-3, xp=backend.xp
    )
    expected = np.zeros(1500)
    expected[0] = 1.0
    assert_on(numeric["w"], backend)
    np.testing.assert_allclose(host(numeric["w"]), expected, rtol=0, atol=1e-9)


def test_a_cost_writing_into_its_inputs_cannot_spoil_later_rows(backend):
    # A reused buffer is refilled whole before every call, not just where the last rows
    # differed: a cost that zeroes its inputs after reading them gets the right gradient.
    xp = backend.xp
    params, c, host_w = _tuned_case(backend)
    layout = Layout.of(params)

    def vandal(p, c):
        J = xp.sum(c * p["w"] * p["w"], axis=-1)
        p["w"][...] = 0.0
        return J

    numeric = evaluation.central_differences(vandal, params, (c,), layout=layout, epsilon=1e-3, xp=xp)
    np.testing.assert_allclose(
        host(numeric["w"]), 2 * np.linspace(0.5, 2.0, 1500) * host_w, rtol=0, atol=1e-8
    )


def test_rows_are_c_contiguous_on_numpy():
    # A C-ordered (B, n) stack: NumPy copies a broadcast view in Fortran order, and the GEMMs
    # over such rows ran ~2x slower on the L model of bench/run.py.
    import array_api_compat.numpy as xp

    flat = xp.reshape(xp.asarray(np.arange(12.0)), (-1,))
    rows, _ = evaluation.coordinate_rows(flat, xp.full((12,), 0.5), (1.0, -1.0), xp=xp)
    for start, stop in [(0, 5), (5, 9), (9, 24)]:  # a fresh buffer, a reused one, a larger one
        points = rows(start, stop)
        assert points.flags["C_CONTIGUOUS"] and points.shape == (stop - start, 12)
        expected = np.tile(np.arange(12.0), (stop - start, 1))
        for r in range(start, stop):
            expected[r - start, r % 12] += 0.5 if r < 12 else -0.5
        assert points.tobytes() == expected.tobytes()


# ------------------------------------------------------------- every batched chunk verified


def _global_max_case(backend, top: int, side: int = 12):
    """J(W) = Σ sin(W / max W)·C, written with a reduction over ALL axes (``xp.max(W)``), and
    its exact gradient. Stacked, the max runs over the whole batch, so only the chunks
    holding rows that raise W's largest element (flat ``top``) are wrong: the chunk of its
    +h row, and of its +2h row, wherever those chunks fall."""
    xp = backend.xp
    rng = np.random.default_rng(top)
    W = rng.uniform(0.1, 1.0, size=(side, side))
    W.flat[top] = 1.5
    C = rng.normal(size=(side, side))
    S = np.cos(W / 1.5) * C
    g = S / 1.5
    g.flat[top] -= np.sum(S * W) / 1.5**2

    def cost(W, C):
        return xp.sum(xp.sin(W / xp.max(W)) * C, axis=(-2, -1))

    def move(a):
        return xp.asarray(a, dtype=xp.float64, device=backend.device)

    return cost, move(W), move(g), move(C), g


@settings(max_examples=6, deadline=None)
@given(top=st.integers(0, 143), rows=st.sampled_from([16, 32, 64]))
@example(top=100, rows=64)  # its +h row in the 2nd of 9 chunks, its +2h row in the 6th
def test_a_cost_wrong_in_any_one_chunk_is_never_trusted(backend, top, rows):
    # 576 rows of a 144-element tensor, `rows` per call: 9 to 36 chunks. Before every chunk
    # was verified, a wrong gradient passed wherever the wrong chunks were not the first.
    cost, W, g, C, host_g = _global_max_case(backend, top)
    budget = rows * 144 * 8
    correct = gc.check(cost, W, g, C, memory_budget=budget)
    assert correct.verdict == "pass", str(correct)
    result = correct.parameters["theta"]
    assert result.path in ("loop", "vmap")  # never the broadcast that mixes the rows' maxima
    if result.path == "loop":  # caught at a coordinate row or a random direction measuring δ
        assert "broadcast: batched values differ from single calls at J(" in result.path_reason
    wrong = host_g.copy()
    wrong.flat[top] *= 0.5  # the element whose rows are mis-normalised, and one elsewhere
    wrong.flat[(top + 77) % 144] *= 0.5
    bad = gc.check(cost, W, gc.backends.to_backend(wrong, backend), C, memory_budget=budget)
    assert bad.verdict == "fail", str(bad)
    with pytest.raises(
        gc.CostError, match=r"parameter 'theta' of shape \(12, 12\): .* differ from single calls"
    ):
        gc.check(cost, W, g, C, memory_budget=budget, mode="stacked")


def test_the_checked_row_of_a_chunk_is_the_same_everywhere(backend):
    # One row per chunk is compared with a single call, drawn from a generator seeded by
    # the chunk: the same rows locally and on threads (and on Dask workers, which run the
    # same evaluate_chunk), and not always a chunk's first.
    xp = backend.xp
    X, Y, params = mlp.random_case([12, 10, 6, 1], 20, seed=5, xp=xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    base = {k: host(v) for k, v in params.items()}
    moved = {1: set(), 2: set()}  # (name, flat index, +1/-1·multiplier) of every single call's row

    def recording(workers):
        def cost(p, X, Y):
            if all(v.ndim == base[k].ndim for k, v in p.items()):
                for k, v in p.items():
                    for i in np.flatnonzero(host(v) != base[k]):
                        moved[workers].add((k, int(i), float(np.sign(host(v).flat[i] - base[k].flat[i]))))
            return mlp.cost(p, X, Y)

        return cost

    for workers in (1, 2):  # the default budget: the chunks are MAX_CHUNK_ROWS rows, two threads
        report = gc.check(recording(workers), params, grads, X, Y, workers=workers)
        assert report.verdict == "pass" and report.parameters["W1"].path == "broadcast"
    assert "chunks of rows evaluated on 2 threads (BLAS on 1 thread each)" in report.notes
    assert moved[1] == moved[2]
    n_rows, size = 2 * 120, evaluation.MAX_CHUNK_ROWS  # the first stage: ±h for every element
    chunks = [(start, min(start + size, n_rows)) for start in range(size, n_rows, size)]
    chosen = [evaluation.paths.checked_row("W1", start, stop) for start, stop in chunks]
    assert all(start <= row < stop for row, (start, stop) in zip(chosen, chunks))
    assert len({row - start for row, (start, _) in zip(chosen, chunks)}) > 1  # not always one offset
    for row in chosen:  # row k·120 + i moves element i by the k-th of (+h, −h)
        assert ("W1", row % 120, (1.0, -1.0)[row // 120]) in moved[1]


# --------------------------------------------------------- a failed probe is retried once


def _flaky(backend, failures):
    """The MLP's cost, raising on its first ``failures`` batched calls; and the calls it got."""
    calls = {"batched": 0, "single": 0, "raised": 0}

    def cost(p, X, Y):
        batched = any(v.ndim == 3 for v in p.values())
        calls["batched" if batched else "single"] += 1
        if batched and calls["raised"] < failures:
            calls["raised"] += 1
            raise RuntimeError("device busy")
        return mlp.cost(p, X, Y)

    return cost, calls


def test_a_probe_that_fails_once_keeps_the_batched_path(backend):
    # One transient exception on the first (probe) call used to send that tensor to one
    # call per row for the whole check: 236 calls instead of 24 here.
    xp = backend.xp
    X, Y, params = mlp.random_case([12, 10, 6, 1], 20, seed=3, xp=xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    cost, calls = _flaky(backend, failures=1)
    report = gc.check(cost, params, grads, X, Y, **gc.NOTEBOOK)
    assert report.verdict == "pass" and calls["raised"] == 1
    assert {r.path for r in report.parameters.values()} == {"broadcast"}
    first = report.parameters["W1"]  # the first tensor, whose probe raised
    assert first.path_reason == (
        "broadcast: a batched call raised RuntimeError: device busy; retried, it ran and agreed with single calls"
    )
    assert all(report.parameters[name].path_reason == "" for name in params if name != "W1")
    # The report's line stays short (issue 19); the reason in full is the parameter's path_reason.
    assert "evaluation: W1 broadcast (retried); b1, W2, b2, W3, b3 broadcast" in str(report)
    assert calls["single"] < 3 * len(params) + 4 * 120 // 64  # a few checks per tensor, no loop


def test_a_cost_that_always_fails_batched_still_loops_and_says_so(backend):
    xp = backend.xp
    X, Y, params = mlp.random_case([12, 10, 6, 1], 20, seed=3, xp=xp, device=backend.device)
    grads = mlp.backward(params, X, Y)

    def cost(p, X, Y):
        if any(v.ndim == 3 for v in p.values()):
            raise RuntimeError("no batches here")
        return mlp.cost(p, X, Y)

    report = gc.check(cost, params, grads, X, Y, **gc.NOTEBOOK)
    assert report.verdict == "pass"
    for result in report.parameters.values():
        assert result.path in ("loop", "vmap")  # torch's vmap calls the cost one point at a time
        assert result.path_reason.startswith(
            "broadcast: RuntimeError: no batches here (and again when retried)"
        ), result.path_reason
    with pytest.raises(
        gc.CostError, match=r"RuntimeError: no batches here \(at a batch of 2 perturbed copies"
    ):
        gc.check(cost, params, grads, X, Y, mode="stacked")


# ------------------------------------------------- memory that grows with rows, per chunk


@pytest.mark.parametrize("sampled", [False, True])
def test_a_row_group_holds_nothing_per_row(backend, sampled):
    # Perturbing two rows of a 200,000-element tensor (800,000 rows of ±h, ±2h) used to
    # build host lists covering every row (~100 bytes each); naming a row moved the whole
    # sample to the host. Now both allocate for the rows asked for only.
    import tracemalloc

    xp, n = backend.xp, 200_000
    w = xp.asarray(np.linspace(-1.0, 1.0, n), dtype=xp.float64, device=backend.device)
    elements = {"w": xp.arange(0, n, 2, device=backend.device)} if sampled else None
    steps = {"w": xp.full((n,), 1e-3, dtype=xp.float64, device=backend.device)}
    stencil = evaluation.Stencil(
        lambda p: xp.sum(p["w"] ** 2, axis=-1),
        {"w": w},
        (),
        Layout.of({"w": w}),
        steps,
        (1.0, -1.0, 2.0, -2.0),
        elements=elements,
    )
    group = evaluation.row_group(stencil, "w", xp=xp)
    per = n // 2 if sampled else n
    assert group.n_rows == 4 * per
    tracemalloc.start()
    try:
        moved = group.points(per + 7, per + 9) if group.points is not None else None
        named = group.describe(3 * per + 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    element = 2 * 5 if sampled else 5
    assert named == f"J(w[{element}] − 2h)"
    if moved is not None:  # (the libraries that perturb in place: NumPy, PyTorch)
        positions, values, originals = moved
        first, second = (2 * 7, 2 * 8) if sampled else (7, 8)
        assert positions == [first, second]
        assert originals == [
            float(np.linspace(-1.0, 1.0, n)[first]),
            float(np.linspace(-1.0, 1.0, n)[second]),
        ]
        assert values == [originals[0] - 1e-3, originals[1] - 1e-3]
    assert peak < n  # not one byte per row of the tensor


def test_screen_directions_drawn_per_chunk_give_the_held_ones_report(backend, monkeypatch):
    # The fast screen's k×n direction matrices sat outside memory_budget (+2.2 GB at 10⁷
    # parameters with a 256 MiB budget). Now each direction is drawn from (seed, tensor, j)
    # where it is used; large ones are never held. Held or drawn, the rows are the same
    # numbers: the reports are identical, bit for bit.
    from gcbackend import plan

    X, Y, params = mlp.random_case([6, 5, 1], 7, seed=3, xp=backend.xp, device=backend.device)
    grads = mlp.backward(params, X, Y)
    wrong = dict(grads, W1=grads["W1"] * 1.01)
    held = [gc.check(mlp.cost, params, g, X, Y, mode="directions", directions=5) for g in (grads, wrong)]
    monkeypatch.setattr(plan, "HELD_BYTES", 0)
    drawn = [gc.check(mlp.cost, params, g, X, Y, mode="directions", directions=5) for g in (grads, wrong)]
    assert [r.verdict for r in drawn] == ["pass", "fail"], str(drawn[1])
    assert drawn[1].faults == ("W1",)
    for a, b in zip(held, drawn):
        assert str(a) == str(b)
        assert a.evaluations == b.evaluations
        for name in a.parameters:
            assert np.array_equal(
                host(a.parameters[name].numeric_grad), host(b.parameters[name].numeric_grad)
            )
            assert_on(b.parameters[name].numeric_grad, backend)


def test_screen_directions_are_never_held_at_scale():
    # The plan draws uᵀg one direction at a time and keeps no k×n matrix beyond HELD_BYTES;
    # a chunk's rows draw only their own directions.
    import tracemalloc

    from gcbackend.evaluation.directions import Directions

    n, k = 500_000, 16  # 64 MB as one float64 matrix
    units = Directions(seed=0, tensor=0, count=k, n=n)
    g = np.linspace(-1.0, 1.0, n)
    tracemalloc.start()
    try:
        products = units.products(g)
        rows = units.displacements(np.arange(k), np.full(k, 1e-3)).host_rows(np.asarray([3, 9]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not units.held
    assert peak < 6 * n * 8  # a few vectors of n, not k of them
    third = np.random.default_rng((0, 0, 3)).standard_normal(n)
    third /= np.linalg.norm(third)
    assert np.array_equal(rows[0], third * 1e-3)
    assert products[3] == float(third @ g)
    assert rows.shape == (2, n)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "directions", "directions": 8},
        {"mode": "directions", "directions": 8, "workers": 2},
        {"sample": 16},
        {"sample": 16, "workers": 2},
    ],
    ids=["screen", "screen-2-threads", "sample", "sample-2-threads"],
)
def test_a_whole_check_stays_within_the_budget_and_a_few_copies_of_theta(options):
    # issue 20: memory_budget bounded only the perturbed copies; the drawn directions, the
    # products and sums of a chunk's rows (4 row-sized arrays per row) and every thread's own
    # chunk came on top (10⁷ parameters, 256 MiB: +1.2 GB). Now the chunks hold
    # ROW_FOOTPRINT arrays per row within the budget, the threads share it, and beyond it
    # the check keeps a few copies of θ (its own θ, gradient and data, never the user's)
    # and the cost's temporaries for one chunk. NumPy reports its allocations to tracemalloc.
    import tracemalloc

    from gcbackend.models import linear

    n = 400_000
    theta = np.linspace(-1.0, 1.0, n)
    x = np.cos(np.arange(n, dtype=np.float64))
    g = linear.gradient(theta, x)
    copy = theta.nbytes
    budget = 12 * copy  # 3 rows of ROW_FOOTPRINT arrays: the budget, not the cache, rules
    gc.check(linear.cost, theta[:1000], g[:1000], x[:1000], memory_budget=budget, **options)  # warm
    tracemalloc.start()
    try:
        report = gc.check(linear.cost, theta, g, x, memory_budget=budget, **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.verdict == "pass", str(report)
    chunk_temporaries = budget // evaluation.ROW_FOOTPRINT  # θ·x for each row of a chunk
    assert peak <= budget + chunk_temporaries + 9 * copy, (peak / copy, budget / copy)


def test_threads_hold_the_one_thread_chunks_within_the_budget_and_the_report_says_when_fewer():
    # Each thread holds its own chunk; the chunks stay the one-thread check's (PyTorch's batched
    # GEMMs are not bitwise the same at every batch size), so the budget sets how many threads.
    X, Y, params = mlp.random_case([12, 10, 6, 1], 20, seed=5)
    grads = mlp.backward(params, X, Y)
    F, row = evaluation.ROW_FOOTPRINT, 120 * 8  # W1, the largest tensor: 240 rows in the first stage
    one = gc.check(mlp.cost, params, grads, X, Y, memory_budget=F * row)  # one row per chunk
    both = gc.check(mlp.cost, params, grads, X, Y, memory_budget=F * row, workers=2)
    assert both.notes == (
        *one.notes,
        f"workers=2: 1 thread(s), as memory_budget={F * row} holds one of the largest parameter's chunks at once",
    )
    assert both.difference == one.difference and both.verdict == one.verdict == "pass"
    chunk = F * row * evaluation.MAX_CHUNK_ROWS  # 64 rows: the budget no longer sets the chunk
    budget = 2 * chunk + chunk // 2
    wide = gc.check(mlp.cost, params, grads, X, Y, memory_budget=budget, workers=3)
    assert "chunks of rows evaluated on 2 threads (BLAS on 1 thread each)" in wide.notes
    assert (
        f"workers=3: 2 thread(s), as memory_budget={budget} holds no more of the largest parameter's chunks at once"
        in wide.notes
    )
    assert wide.difference == one.difference
