"""Tests for vps.refinement.lbfgs.EphemeralLBFGS.

The reference is the dense BFGS inverse-Hessian recursion, built in numpy
float64 independently of the two-loop implementation under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vps.refinement.lbfgs import EphemeralLBFGS


def dense_inverse_hessian(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """H from H_{i+1} = (I - rho s y^T) H_i (I - rho y s^T) + rho s s^T, H_0 = gamma I.

    gamma comes from the newest pair, matching the usual L-BFGS scaling.
    """
    n = pairs[0][0].size
    s_new, y_new = pairs[-1]
    h = (s_new @ y_new) / (y_new @ y_new) * np.eye(n)
    eye = np.eye(n)
    for s, y in pairs:
        rho = 1.0 / (y @ s)
        left = eye - rho * np.outer(s, y)
        h = left @ h @ left.T + rho * np.outer(s, s)
    return h


def random_pairs(rng: np.random.Generator, n: int, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k pairs with y = A_i s for random SPD A_i, so y.s > 0 without filtering."""
    pairs = []
    for _ in range(k):
        s = rng.standard_normal(n)
        b = rng.standard_normal((n, n))
        a = b @ b.T / n + 0.5 * np.eye(n)
        pairs.append((s, a @ s))
    return pairs


def feed(op: EphemeralLBFGS, pairs, dtype=torch.float64) -> None:
    for s, y in pairs:
        assert op.update(torch.tensor(s, dtype=dtype), torch.tensor(y, dtype=dtype))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 20),
    k=st.integers(1, 9),
    m=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_two_loop_matches_dense_bfgs(n: int, k: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pairs = random_pairs(rng, n, k)
    op = EphemeralLBFGS(m=m)
    feed(op, pairs)
    assert len(op) == min(m, k)

    g = rng.standard_normal(n)
    expected = dense_inverse_hessian(pairs[-m:]) @ g
    got = op.two_loop(torch.tensor(g, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


def test_float32_agrees_with_float64_reference() -> None:
    rng = np.random.default_rng(3)
    pairs = random_pairs(rng, 12, 4)
    op = EphemeralLBFGS(m=4)
    feed(op, pairs, dtype=torch.float32)
    g = rng.standard_normal(12)
    got = op.two_loop(torch.tensor(g, dtype=torch.float32))
    assert got.dtype == torch.float32
    expected = dense_inverse_hessian(pairs) @ g
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_newest_secant_equation_holds() -> None:
    rng = np.random.default_rng(11)
    pairs = random_pairs(rng, 7, 5)
    op = EphemeralLBFGS(m=3)
    feed(op, pairs)
    s, y = pairs[-1]
    got = op.two_loop(torch.tensor(y)).numpy()
    np.testing.assert_allclose(got, s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,extra_memory", [(3, 0), (6, 0), (6, 3), (10, 1)])
def test_quadratic_recovers_inverse_after_n_conjugate_pairs(n: int, extra_memory: int) -> None:
    # BFGS keeps every earlier secant equation only for Q-conjugate steps (as
    # exact line searches produce), so after n of them H = Q^{-1} exactly.
    rng = np.random.default_rng(n)
    b = rng.standard_normal((n, n))
    q = b @ b.T + n * np.eye(n)
    steps: list[np.ndarray] = []
    for v in rng.standard_normal((n, n)):
        for prev in steps:
            v = v - (prev @ q @ v) / (prev @ q @ prev) * prev
        steps.append(v)

    op = EphemeralLBFGS(m=n + extra_memory)
    feed(op, [(s, q @ s) for s in steps])
    g = rng.standard_normal(n)
    got = op.two_loop(torch.tensor(g)).numpy()
    np.testing.assert_allclose(got, np.linalg.solve(q, g), rtol=1e-8, atol=1e-10)


def test_no_pairs_returns_copy_of_g() -> None:
    op = EphemeralLBFGS()
    g = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = op.two_loop(g)
    assert torch.equal(out, g)
    assert out.shape == g.shape and out.dtype == g.dtype
    out.add_(1.0)
    assert torch.equal(g, torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_pairs_with_small_or_negative_curvature_are_skipped() -> None:
    op = EphemeralLBFGS(m=3, eps=1e-6)
    s = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert not op.update(s, -s)
    assert not op.update(s, torch.zeros(3, dtype=torch.float64))
    assert not op.update(s, torch.tensor([1e-6, 5.0, 0.0], dtype=torch.float64))  # y.s == eps
    assert len(op) == 0
    assert op.update(s, torch.tensor([2e-6, 5.0, 0.0], dtype=torch.float64))
    assert len(op) == 1


def test_non_finite_pairs_are_rejected_and_non_finite_g_raises() -> None:
    op = EphemeralLBFGS()
    good = torch.ones(4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = good.clone()
        poisoned[2] = bad
        assert not op.update(poisoned, good)
        assert not op.update(good, poisoned)
    assert len(op) == 0
    assert op.update(good, good)
    with pytest.raises(ValueError, match="non-finite"):
        op.two_loop(torch.tensor([1.0, float("nan"), 0.0, 0.0]))


def test_fifo_eviction_keeps_newest_pairs_in_order() -> None:
    op = EphemeralLBFGS(m=2)
    vectors = [torch.full((3,), float(i + 1)) for i in range(4)]
    for v in vectors:
        op.update(v, 2 * v)
    assert len(op) == 2
    kept = [s for s, _ in op.pairs]
    assert torch.equal(kept[0], vectors[2]) and torch.equal(kept[1], vectors[3])
    assert isinstance(op.pairs, tuple)


def test_stored_pairs_are_isolated_from_caller_mutation() -> None:
    op = EphemeralLBFGS()
    s = torch.ones(2, 2)
    y = 3 * torch.ones(2, 2)
    op.update(s, y)
    s.zero_()
    stored_s, stored_y = op.pairs[0]
    assert stored_s.shape == (4,) and torch.equal(stored_s, torch.ones(4))
    assert stored_y.dtype == torch.float32


def test_reset_forgets_history() -> None:
    op = EphemeralLBFGS()
    op.update(torch.ones(3), 4 * torch.ones(3))
    g = torch.tensor([1.0, 2.0, 3.0])
    assert not torch.equal(op.two_loop(g), g)
    op.reset()
    assert len(op) == 0 and op.pairs == ()
    assert torch.equal(op.two_loop(g), g)
    # After reset a different problem size is allowed.
    assert op.update(torch.ones(5), torch.ones(5))


def test_shape_and_size_errors_name_the_problem() -> None:
    op = EphemeralLBFGS()
    with pytest.raises(ValueError, match="same shape"):
        op.update(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="dtype"):
        op.update(torch.ones(3), torch.ones(3, dtype=torch.float64))
    op.update(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="elements"):
        op.update(torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="elements"):
        op.two_loop(torch.ones(4))


@pytest.mark.parametrize("kwargs", [{"m": 0}, {"m": 2.5}, {"m": True}, {"eps": -1.0}, {"eps": float("nan")}])
def test_constructor_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        EphemeralLBFGS(**kwargs)
