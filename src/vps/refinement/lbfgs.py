"""A short-lived limited-memory BFGS inverse-Hessian operator over flat tensors.

"Ephemeral" because the history lives only as long as one optimisation episode
(for instance the few inner steps taken for a single prompt) and is then
discarded with :meth:`EphemeralLBFGS.reset`.  The class only supplies the
quasi-Newton product ``H_k g``; step sizes, line searches and sign conventions
belong to the caller.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import Tensor

__all__ = ["EphemeralLBFGS"]


class EphemeralLBFGS:
    """Stores the last ``m`` curvature pairs and applies the L-BFGS inverse Hessian.

    Args:
        m: Number of ``(s, y)`` pairs kept; the oldest pair is evicted first.
        eps: A pair is stored only when ``y.s > eps``.  The threshold is
            absolute, so it should be chosen with the scale of ``s`` and ``y``
            in mind; the default only guards against non-positive curvature
            and rounding noise.

    Pairs are stored as detached, flattened copies in the caller's dtype and on
    the caller's device.  Copies (rather than views) are kept because callers
    typically update their parameter and gradient buffers in place, which would
    otherwise rewrite the history behind the operator's back.
    """

    def __init__(self, m: int = 5, eps: float = 1e-10) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be a positive integer, got {m!r}")
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
        self.m = m
        self.eps = eps
        # Each entry is (s, y, rho = 1 / y.s); rho is kept as a Python float so
        # the recursion never re-derives it from a possibly lower-precision dot.
        self._history: deque[tuple[Tensor, Tensor, float]] = deque(maxlen=m)
        self._gamma = 1.0

    def __len__(self) -> int:
        return len(self._history)

    @property
    def pairs(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """The stored ``(s, y)`` pairs, oldest first.

        A tuple is returned so the history cannot be reordered through it; the
        tensors themselves are the stored copies and must not be mutated.
        """
        return tuple((s, y) for s, y, _ in self._history)

    def reset(self) -> None:
        """Forget every stored pair; the operator becomes the identity again."""
        self._history.clear()
        self._gamma = 1.0

    def update(self, s: Tensor, y: Tensor) -> bool:
        """Offer a curvature pair ``s = x_{k+1} - x_k``, ``y = g_{k+1} - g_k``.

        Returns:
            ``True`` when the pair was stored.  ``False`` when it was rejected
            because ``y.s <= eps`` (the BFGS update would lose positive
            definiteness) or because ``s``, ``y`` or their products are not
            finite.

        Raises:
            ValueError: If ``s`` and ``y`` differ in shape, dtype or device, are
                not floating point, or have a different number of elements
                than the pairs already stored.
        """
        if s.shape != y.shape:
            raise ValueError(
                f"s and y must have the same shape, got s {tuple(s.shape)} and y {tuple(y.shape)}"
            )
        if s.dtype != y.dtype or s.device != y.device:
            raise ValueError(
                f"s and y must share dtype and device, got s {s.dtype}/{s.device} and y {y.dtype}/{y.device}"
            )
        if not s.is_floating_point():
            raise ValueError(f"s and y must be floating point tensors, got {s.dtype}")
        if self._history and s.numel() != self._history[0][0].numel():
            raise ValueError(
                f"s and y have {s.numel()} elements but the stored pairs have "
                f"{self._history[0][0].numel()}; call reset() before changing the problem size"
            )
        s_flat = s.detach().reshape(-1)
        y_flat = y.detach().reshape(-1)
        ys = float(torch.dot(y_flat, s_flat))
        yy = float(torch.dot(y_flat, y_flat))
        # Any inf/nan in s or y propagates into ys or yy (inf * 0 is nan), so
        # checking the two scalars rejects such pairs without a separate scan.
        if not (math.isfinite(ys) and math.isfinite(yy)):
            return False
        if ys <= self.eps or yy <= 0.0:
            return False
        self._history.append((s_flat.clone(), y_flat.clone(), 1.0 / ys))
        self._gamma = ys / yy
        return True

    def two_loop(self, g: Tensor) -> Tensor:
        """Return ``H_k g`` by the L-BFGS two-loop recursion.

        The initial matrix is ``H_0 = gamma I`` with ``gamma = s.y / y.y`` from
        the newest stored pair.  With no stored pair the result equals ``g``
        (``H_0 = I``), so callers fall back to a plain gradient step.

        The result is a new tensor with ``g``'s shape, dtype and device; the
        stored pairs are cast to ``g``'s dtype and device for the computation.

        Raises:
            ValueError: If ``g`` is not finite, not floating point, or its
                number of elements differs from the stored pairs.
            FloatingPointError: If the recursion overflows to a non-finite
                result despite finite inputs.
        """
        if not g.is_floating_point():
            raise ValueError(f"g must be a floating point tensor, got {g.dtype}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError("g contains non-finite values; refusing to apply the L-BFGS operator")
        if self._history and g.numel() != self._history[0][0].numel():
            raise ValueError(
                f"g has {g.numel()} elements but the stored pairs have {self._history[0][0].numel()}"
            )
        q = g.detach().reshape(-1).clone()
        if not self._history:
            return q.reshape(g.shape)

        cast = [(s.to(q), y.to(q), rho) for s, y, rho in self._history]
        # Alphas stay as 0-d tensors so the recursion does not force a host
        # synchronisation per pair on accelerators.
        alphas: list[Tensor] = []
        for s, y, rho in reversed(cast):
            alpha = rho * torch.dot(s, q)
            q.sub_(alpha * y)
            alphas.append(alpha)
        r = q.mul_(self._gamma)
        for (s, y, rho), alpha in zip(cast, reversed(alphas), strict=True):
            beta = rho * torch.dot(y, r)
            r.add_((alpha - beta) * s)
        if not bool(torch.isfinite(r).all()):
            raise FloatingPointError(
                "L-BFGS two-loop recursion produced non-finite values from finite inputs"
            )
        return r.reshape(g.shape)
