"""`plan_matrix`, the pure arithmetic of a plan, against a dense float64 reference."""

import pytest
import torch

from vps.plan import plan_matrix

D_OUT, D_IN, R = 7, 6, 3


def gathers(w, in_idx, out_idx):
    """What the layer hands plan_matrix: W[out_idx] rows and W[:, in_idx]^T columns, per sequence."""
    return w[out_idx], w.t()[in_idx]


def dense_delta(w, in_idx, out_idx, coef, rank, order, gamma, tau):
    """One sequence's perturbation as a (d_out, d_in) matrix: g B_c A_c^T (+ g^2 B_c M A_c^T), clipped."""
    w = w.double()
    U = torch.zeros(D_IN, R, dtype=torch.float64)
    U[in_idx, range(R)] = 1
    onehot = torch.zeros(D_OUT, len(out_idx), dtype=torch.float64)
    onehot[out_idx, range(len(out_idx))] = 1
    V = onehot if coef is None else onehot @ coef.double()
    A, B = w.T @ V, w @ U
    prod = A.norm(dim=0) * B.norm(dim=0)
    s = torch.where(prod <= tau, 1.0, (tau / prod).sqrt()) * (torch.arange(R) < rank)
    A, B = A * s, B * s
    delta = gamma * B @ A.T
    if order == 2:
        delta = delta + gamma**2 * B @ (V.T @ w @ U) @ A.T
    return delta


def case(seed, coef_width=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_OUT, D_IN, generator=g)
    in_idx = torch.stack([torch.randperm(D_IN, generator=g)[:R] for _ in range(2)])
    k = R if coef_width is None else coef_width
    out_idx = torch.stack([torch.randperm(D_OUT, generator=g)[:k] for _ in range(2)])
    coef = None if coef_width is None else torch.randn(2, k, R, generator=g)
    return w, in_idx, out_idx, coef


CASES = [
    # name, coef width (None: one-hot V), rank per row, order per row, max order, tau
    ("order 1, one-hot", None, [3, 3], [1, 1], 1, 100.0),
    ("order 1, mixed outputs", 5, [3, 3], [1, 1], 1, 100.0),
    ("order 2, one-hot", None, [3, 3], [2, 2], 2, 100.0),
    ("order 2, mixed outputs", 5, [3, 3], [2, 2], 2, 100.0),
    ("order 2 allowed, one row at order 1", 4, [3, 3], [2, 1], 2, 100.0),
    ("rank mask", None, [1, 2], [1, 1], 1, 100.0),
    ("clip bites", 4, [3, 2], [2, 2], 2, 0.5),
]


@pytest.mark.parametrize("name, width, rank, order, max_order, tau", CASES, ids=[c[0] for c in CASES])
def test_plan_matrix_matches_dense(name, width, rank, order, max_order, tau):
    w, in_idx, out_idx, coef = case(len(name), width)
    rows, cols = gathers(w, in_idx, out_idx)
    gamma = torch.tensor([0.7, 0.3])
    q, ok = plan_matrix(rows, cols, in_idx, coef, torch.tensor(rank), torch.tensor(order), gamma, tau, max_order)
    assert q.shape == (2, R, D_OUT) and ok.all()
    x = torch.randn(5, D_IN, dtype=torch.float64)
    for b in range(2):
        c = None if coef is None else coef[b]
        mix = torch.eye(R, dtype=torch.float64) if c is None else c.double()
        got = ((x @ w.double().T)[:, out_idx[b]] @ mix) @ q[b].double()  # how the layer applies Q
        want = x @ dense_delta(w, in_idx[b], out_idx[b], c, rank[b], order[b], float(gamma[b]), tau).T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_untouched_components_are_exact():
    # a clip that does not bite and a full rank leave Q exactly gamma * B^T
    w, in_idx, out_idx, _ = case(1)
    rows, cols = gathers(w, in_idx, out_idx)
    gamma = torch.tensor([0.5, 1.0])
    q, _ = plan_matrix(rows, cols, in_idx, None, torch.tensor([R, R]), torch.tensor([1, 1]), gamma, 1e9, 1)
    assert torch.equal(q, gamma[:, None, None] * cols)


@pytest.mark.parametrize("max_order", [1, 2])  # order 1 checks finiteness on (B, R) values, order 2 on Q
@pytest.mark.parametrize("broken", ["gamma", "weight", "weight beyond rank", "row", "selection"])
def test_unusable_rows_are_zero_and_flagged(broken, max_order):
    w, in_idx, out_idx, _ = case(2)
    rows, cols = gathers(w, in_idx, out_idx)
    gamma = torch.tensor([0.5, 0.5])
    sel_ok = None
    if broken == "gamma":
        gamma[1] = float("nan")
    elif broken == "weight":
        cols[1, 0, 0] = float("inf")
    elif broken == "weight beyond rank":  # a component the rank mask drops still poisons Q (0 * inf)
        cols[1, R - 1, 0] = float("inf")
    elif broken == "row":
        rows[1, 0, 0] = float("nan")
    else:
        sel_ok = torch.tensor([True, False])
    rank = torch.tensor([R, R - 1 if broken == "weight beyond rank" else R])
    q, ok = plan_matrix(rows, cols, in_idx, None, rank, torch.tensor([max_order] * 2), gamma, 0.8, max_order,
                        sel_ok)
    assert ok.tolist() == [True, False]
    assert torch.equal(q[1], torch.zeros_like(q[1])) and torch.isfinite(q[0]).all() and q[0].abs().sum() > 0


def test_only_gamma_carries_autograd():
    w, in_idx, out_idx, coef = case(3, 4)
    rows, cols = gathers(w, in_idx, out_idx)
    gamma = torch.tensor([0.5, 0.2], requires_grad=True)
    q, ok = plan_matrix(rows, cols, in_idx, coef, torch.tensor([R, R]), torch.tensor([2, 2]), gamma, 0.8, 2)
    assert q.requires_grad and not ok.requires_grad
    q.sum().backward()
    assert gamma.grad is not None and torch.isfinite(gamma.grad).all()


def test_inputs_are_left_alone():
    w, in_idx, out_idx, coef = case(4, 4)
    rows, cols = gathers(w, in_idx, out_idx)
    before = [t.clone() for t in (rows, cols, in_idx, coef)]
    plan_matrix(rows, cols, in_idx, coef, torch.tensor([2, 3]), torch.tensor([2, 1]), torch.tensor([1.0, 1.0]), 0.1, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, (rows, cols, in_idx, coef), strict=True))
