"""`plan_tensors`: one layer's plan computed from its forward's tensors, as a pure function.

It runs the method's chain for one `VPSLinear` forward: activation statistics (`vps.activation_stats`),
top-k ranking, the adaptive policy's decision, the selector (SK, SC or Hybrid), the spectral clip and the
matrix ``Q`` (`vps.plan`). The layer reads the model-level context (token mask, shared rankings, coupling,
entropy, history, a captured gradient) in Python and hands this function tensors and constants only, so
the same code runs eagerly, compiled on its own (`vps.compile_plans`) or as a nested compile region inside
a whole compiled model (`vps.plan_region`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import activation_stats
from .builders import BuildInputs, HybridBuilder, SCBuilder, SKBuilder, rank_features
from .context import TokenMask
from .dtypes import as_float32, constant
from .plan import input_factor_t, plan_matrix
from .policy import LayerPolicy


@dataclass(frozen=True)
class PlanSpec:
    """The Python constants of a layer that `plan_tensors` reads; equal for the layers of one config, so
    a compiled plan guards on the same values for all of them."""

    topk: int  # K candidates ranked per side
    transposed: bool  # the weight is stored (d_in, d_out) (GPT-2 Conv1D)
    tau: float  # spectral clip bound per rank-1 term
    max_order: int  # 2: the order-2 term is formed (and applied where the policy chose it)
    damping: bool  # the series at -gamma


class PlanParts(NamedTuple):
    """The tensors `plan_tensors` returns: a `Plan`'s, its selection's and its decision's (flat, so that a
    compiled plan returns plain graph outputs)."""

    in_rank: torch.Tensor  # (B, K) input features by descending score (shared with layers on the same input)
    in_idx: torch.Tensor  # (B, R)
    out_idx: torch.Tensor  # (B, K')
    coef: torch.Tensor | None  # (B, K', R) float32; None for SK
    selection_ok: torch.Tensor | None  # (B,) bool, SC only
    sigma: torch.Tensor  # (B,) the decision's fields
    rank: torch.Tensor
    topk: torch.Tensor
    gamma: torch.Tensor
    order: torch.Tensor
    energy: torch.Tensor
    q: torch.Tensor  # (B, R, d_out) in the compute dtype
    ok: torch.Tensor  # (B,) bool: the row's plan is usable
    a_fold: torch.Tensor  # (B, d_in, R) in the compute dtype
    bias_sel: torch.Tensor | None  # (B, K')


def plan_tensors(spec: PlanSpec, policy: LayerPolicy, builder: SKBuilder | SCBuilder | HybridBuilder,
                 x: torch.Tensor, h0: torch.Tensor, valid: torch.Tensor, pad: torch.Tensor | None,
                 count: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, gain: torch.Tensor,
                 in_rank: torch.Tensor | None, out_rank: torch.Tensor | None, energy: torch.Tensor | None,
                 entropy: torch.Tensor | None, history_bias: float | torch.Tensor, grad: torch.Tensor | None,
                 dtype: torch.dtype) -> PlanParts:
    """One layer's plan from its forward's tensors: statistics, ranking, policy, selection, clip and ``Q``.

    ``x`` (B, T, d_in) and ``h0`` (B, T, d_out, the base output without bias) are in the plan's layout
    (one row for ``scope="batch"``); ``valid``, ``pad`` and ``count`` are the `TokenMask`'s fields, with
    ``count`` None when every token is valid (the row length then). ``in_rank`` is the input ranking a
    layer on the same input computed already (None: computed here and returned); ``out_rank`` and
    ``energy`` come from the Q/K coupling (None: computed here). ``history_bias`` is
    `LayerPolicy.bias_for`, ``grad`` the captured output gradient, ``gain`` the layer's gain (the only
    input that may carry autograd) and ``dtype`` the compute dtype of ``Q`` and ``A``.

    The function touches no Python state, so `vps.compile_plans` compiles it once per shape class and
    every patched layer calls the same compiled code.
    """
    tm = TokenMask(valid, pad, count if count is not None else valid.shape[1])
    with torch.no_grad():
        if in_rank is None:
            in_rank = rank_features(activation_stats.input_scores(x, tm), spec.topk, nonnegative=True)
        if out_rank is None or energy is None:
            scores, energy = activation_stats.output_scores(h0, tm)
            out_rank = rank_features(scores, spec.topk, nonnegative=True)
        decision = policy.decide(energy, entropy, history_bias)
        sel = builder.build(BuildInputs(x, h0, valid, in_rank, out_rank, decision, grad))
        cols = _gather_rows(weight if spec.transposed else weight.t(), sel.in_idx)  # W[:, in_idx]^T = B^T
        rows = _gather_rows(weight.t() if spec.transposed else weight, sel.out_idx)  # W[out_idx]: (B, K', d_in)
        bias_sel = None if bias is None else bias[sel.out_idx]
        coef = sel.coef
        if coef is not None and sel.ok is not None:
            # A failed SC solve can leave non-finite coefficients. Its row of Q is zeroed, but
            # NaN * 0 is NaN, so the row would not fall back to the base output (docs/design.md §8):
            # its coefficients are zeroed here, once per plan, for every way the plan is applied.
            coef = torch.where(sel.ok[:, None, None], coef, constant(0.0, coef.dtype, coef.device))
        # A^T = V^T W, which the clip needs anyway; kept (as A) so that a frozen decode step applies
        # the plan as (x @ A) @ Q. One-hot selectors: A^T is `rows` itself, no op.
        a_t = input_factor_t(rows, coef)
    # Damping is the same series at -gamma: the first-order term flips sign, the order-2 term does not.
    g = -(decision.gamma * gain) if spec.damping else decision.gamma * gain
    q, ok = plan_matrix(rows, cols, sel.in_idx, coef, decision.rank, decision.order, g,
                        spec.tau, spec.max_order, sel.ok, a_t)
    with torch.no_grad():
        # (B, d_in, R): a view, which bmm reads in its transposed layout without a copy. It is
        # finite wherever the base output is (the coefficients were made finite above), so a row
        # whose Q is zero adds exactly nothing.
        a_fold = a_t.transpose(1, 2)
        if a_fold.dtype != dtype:
            a_fold = a_fold.to(dtype)
    return PlanParts(in_rank, sel.in_idx, sel.out_idx, coef, sel.ok, decision.sigma, decision.rank, decision.topk,
                     decision.gamma, decision.order, decision.energy, q if q.dtype == dtype else q.to(dtype),
                     ok, a_fold, bias_sel)


def _gather_rows(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``w[idx]`` for idx (B, K) -> (B, K, d), float32. Called on the weight or its transposed view:
    indexing the leading dimension is a contiguous row gather, far cheaper than advanced indexing along
    the second dimension, and nothing of size d_out x d_in is formed."""
    return as_float32(w[idx])
