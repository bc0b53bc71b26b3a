"""The plan of one `VPSLinear` forward, and the pure arithmetic that builds its matrix ``Q``.

A plan holds the output features to read (``out_idx``), their mixing (``coef``, SC only) and an
(R x d_out) matrix ``Q`` that folds gamma, the per-layer gain, the spectral clip, the rank mask and
the order-2 term, so that the perturbation of a base output ``h = W x`` is

    delta = (h[out_idx] @ coef) @ Q,   Q = S (g I + g^2 [order 2] M^T) S B^T

with ``S = diag(clip scales * rank mask)``, ``g = gamma * gain``, ``B^T = W[:, in_idx]^T`` and
``M = V^T W U`` (R x R): order 2 adds ``gamma^2 B M A^T`` (docs/design.md §1) at the price of one R x R
product. Clipping scales the factors A and B, as the seed does, in both terms.

A plan also holds ``A = W^T V`` itself (``a_fold``, d_in x R per sequence), the folded form of
everything in front of ``Q``: ``h[out_idx] - b[out_idx] = W[out_idx] x``, so
``((h[out_idx] - b[out_idx]) @ coef) @ Q = (x @ A) @ Q``. A forward that reuses a stored plan (frozen
decoding) applies it as two thin products, ``out += (x @ A) @ Q``, instead of a gather, a bias
subtraction and the SC mixing on every step (see `VPSLinear._apply_folded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .builders import Selection
from .dtypes import cached_tensor, constant
from .policy import Decision
from .spectral import squared_clip_scales


@dataclass
class Plan:
    """What a forward needs to apply the perturbation; kept for frozen decoding."""

    out_idx: torch.Tensor  # (B, K')
    coef: torch.Tensor | None  # (B, K', R) float32
    q: torch.Tensor  # (B, R, d_out) in the compute dtype
    a_fold: torch.Tensor  # (B, d_in, R) A = W^T V in the compute dtype: x @ a_fold = (W x)[out_idx] @ coef
    bias_sel: torch.Tensor | None  # (B, K') bias at out_idx, to turn outputs back into W x
    selection: Selection
    decision: Decision

    @property
    def batch(self) -> int:
        return self.out_idx.shape[0]


def plan_matrix(rows: torch.Tensor, cols: torch.Tensor, in_idx: torch.Tensor, coef: torch.Tensor | None,
                rank: torch.Tensor, order: torch.Tensor, gamma: torch.Tensor, tau: float, max_order: int,
                selection_ok: torch.Tensor | None = None,
                a_t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan matrix ``Q`` (B, R, d_out) and a (B,) flag of the rows whose plan is usable.

    ``rows`` is ``W[out_idx]`` (B, K', d_in) and ``cols`` is ``W[:, in_idx]^T = B^T`` (B, R, d_out),
    both float32; ``coef`` (B, K', R) mixes the rows into ``A^T`` (None: one-hot, K' = R). ``rank``
    and ``order`` are the per-sequence decisions (B,); components at or beyond ``rank`` get 0, and
    the order-2 term is formed only when ``max_order`` is 2 and then applied where ``order == 2``.
    ``gamma`` (B,) is the effective scale ``gamma * gain`` and the only input that may carry autograd.

    A row is not usable where ``selection_ok`` is False or its ``Q`` is not finite (a non-finite gain,
    norm, clip scale or weight all end there); such a row of ``Q`` is zero, so it adds nothing.

    ``a_t`` is ``A^T`` (B, R, d_in) when the caller has formed it already (the layer keeps it for
    frozen decoding, see `input_factor_t`); None forms it here from ``rows`` and ``coef``.
    """
    with torch.no_grad():
        a = a_t if a_t is not None else input_factor_t(rows, coef)  # A^T: (B, R, d_in)
        # Clipping scales A_c and B_c by s_c each, so term c is scaled by s_c^2; components beyond
        # the decided rank get 0.
        norm_b = torch.linalg.vector_norm(cols, dim=-1)
        s2 = squared_clip_scales(torch.linalg.vector_norm(a, dim=-1), norm_b, tau)
        s2 = s2 * (_positions(s2.shape[-1], s2.device) < rank.unsqueeze(-1))  # (B, R)
        second = None
        if max_order == 2:
            w_sub = torch.gather(rows, 2, in_idx.unsqueeze(1).expand(-1, rows.shape[1], -1))
            m = w_sub if coef is None else coef.transpose(1, 2) @ w_sub  # M[c, c'] = V_c^T W U_c'
            s = s2.sqrt()
            second = (order == 2).float()[:, None, None] * s[:, :, None] * m.transpose(1, 2) * s[:, None, :]
    if second is None:  # order 1: a diagonal core, so Q is a row scaling of B^T
        scale = gamma[:, None] * s2  # (B, R)
        q = scale.unsqueeze(-1) * cols
        with torch.no_grad():
            # Row c of Q is scale_c * B_c: it is finite exactly when scale_c * ||B_c|| is (short of an
            # overflow of the norm itself), so the check reads (B, R) values, not all of Q.
            ok = _finite((scale.detach() * norm_b).sum(dim=-1))
    else:
        q = (torch.diag_embed(gamma[:, None] * s2) + (gamma * gamma)[:, None, None] * second) @ cols
        with torch.no_grad():
            ok = _finite(q.detach().sum(dim=(1, 2)))
    with torch.no_grad():
        if selection_ok is not None:
            ok = ok & selection_ok
    return torch.where(ok[:, None, None], q, constant(0.0, q.dtype, q.device)), ok


def input_factor_t(rows: torch.Tensor, coef: torch.Tensor | None) -> torch.Tensor:
    """``A^T = V^T W`` (B, R, d_in) from the rows ``W[out_idx]`` (B, K', d_in) and their mixing ``coef``
    (B, K', R); with one-hot selectors (``coef`` None) it is the rows themselves, no op at all."""
    return rows if coef is None else coef.transpose(1, 2) @ rows


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` is finite: ``t - t`` is 0 there and NaN at a NaN or an infinity (two ops; isfinite is four)."""
    return (t - t) == 0


@cached_tensor
def _positions(n: int, device: torch.device) -> torch.Tensor:
    """0, ..., n-1 (cached: every plan of a layer compares against the same positions)."""
    return torch.arange(n, device=device)
