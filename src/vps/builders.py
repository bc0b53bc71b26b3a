"""Selector builders (docs/design.md §2): which input and output features the perturbation uses.

A builder returns a `Selection`: the input selector ``U`` is always one-hot on ``in_idx`` (B, R);
the output selector ``V`` is supported on ``out_idx`` (B, K') with coefficients ``coef`` (B, K', R)
(``coef is None`` means one-hot, K' = R). Keeping V in this compact form is what lets the layer
compute ``A = W^T V`` and ``x A = (W x)[out_idx] @ coef`` with gathers instead of dense products.

- SK: the R highest-scoring input features (mean |x|) and output features (mean |x W^T|) over the
  valid tokens, sorted by score, ties to the lower index.
- SC: the seed's ridge coupling ``(X_A^T X_A + alpha I) T = X_A^T Y`` on the top-k input and
  output candidates (float32), ``V~ = V T^T`` column-normalised. Column c of ``V~`` is the output
  combination predicted by input candidate c, so it pairs with ``U``'s column c; the rank-R result
  keeps the R best-scoring input candidates and their columns. When a gradient G of the loss with
  respect to the layer's output was captured, the target moves against it:
  ``Y <- Y - eta * G_bar`` with ``G_bar`` the gradient's mean over valid tokens and
  ``eta = grad_eta * rms(Y) / rms(G_bar)``, so the step is a fixed fraction of the target's scale.
- Hybrid: SC for a layer exactly when a gradient for that layer's output is available, else SK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import VPSConfig
from .dtypes import as_float32, cached_tensor
from .policy import Decision


@dataclass
class BuildInputs:
    """What a builder sees for one forward (B sequences of T tokens)."""

    x: torch.Tensor  # (B, T, d_in)
    h0: torch.Tensor  # (B, T, d_out) base output without bias
    mask: torch.Tensor  # (B, T) bool, valid tokens
    in_rank: torch.Tensor  # (B, K) input features by descending score
    out_rank: torch.Tensor  # (B, K) output features by descending score
    decision: Decision
    grad: torch.Tensor | None = None  # (B or 1, d_out) mean captured gradient


@dataclass
class Selection:
    """Selectors of one forward: U one-hot on in_idx, V = one-hot(out_idx) @ coef."""

    in_idx: torch.Tensor  # (B, R)
    out_idx: torch.Tensor  # (B, K')
    coef: torch.Tensor | None  # (B, K', R) float32, None = identity (K' = R)
    ok: torch.Tensor | None  # (B,) bool: False where the build failed (row falls back); None: cannot fail
    builder: str


def rank_features(scores: torch.Tensor, k: int, nonnegative: bool = False) -> torch.Tensor:
    """Indices of the k largest scores per row, sorted by score; ties go to the lower index.

    ``nonnegative=True`` promises scores >= 0 (or NaN), as every mean |activation| is, which skips
    the sign fix-up of the sort key.
    """
    # topk gives no tie order and a stable sort of every row is ~10x slower, so rank an exact integer
    # key instead: the float's bits made order-preserving, then the reversed index as tie-breaker.
    s = as_float32(scores)
    s = s if s.is_contiguous() else s.contiguous()
    bits = s.view(torch.int32)
    if not nonnegative:  # the bits of a negative float order backwards
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # add promotes the int32 bits to int64 before scaling them (no separate cast op).
    key = torch.add(_tie_breaker(s.shape[-1], s.device), bits, alpha=1 << 32)
    return torch.topk(key, k, dim=-1, sorted=True).indices


@cached_tensor
def _tie_breaker(d: int, device: torch.device) -> torch.Tensor:
    """d-1, ..., 0: the lower index wins a tie (cached: it is the same for every forward)."""
    return torch.arange(d - 1, -1, -1, device=device, dtype=torch.long)


class SKBuilder:
    """Sparse selector: top-R input and output features by activation score."""

    name = "sk"

    def __init__(self, cfg: VPSConfig) -> None:
        self.cfg = cfg

    def build(self, inp: BuildInputs) -> Selection:
        """One-hot selectors on the R best-scoring features."""
        r = self.cfg.max_rank
        return Selection(inp.in_rank[:, :r], inp.out_rank[:, :r], None, None, self.name)


class SCBuilder:
    """Sylvester-coupled selector: ridge regression between the top-k candidates."""

    name = "sc"

    def __init__(self, cfg: VPSConfig) -> None:
        self.cfg = cfg

    def build(self, inp: BuildInputs) -> Selection:
        """Output selector mixed by the ridge solution, paired with the top-R input features."""
        cfg = self.cfg
        k = inp.in_rank.shape[1]
        r = cfg.max_rank
        valid = inp.mask.unsqueeze(-1)
        cand = torch.arange(k, device=inp.in_rank.device) < inp.decision.topk.unsqueeze(-1)  # (B, K)

        x_a = _take(inp.x, inp.in_rank).float()
        y = _take(inp.h0, inp.out_rank).float()
        x_a = torch.where(valid & cand.unsqueeze(1), x_a, 0.0)
        y = torch.where(valid & cand.unsqueeze(1), y, 0.0)
        if inp.grad is not None:
            y = self._against_gradient(y, inp, valid & cand.unsqueeze(1))

        gram = x_a.transpose(1, 2) @ x_a
        gram = gram + cfg.alpha * torch.eye(k, device=gram.device, dtype=gram.dtype)
        chol, info = torch.linalg.cholesky_ex(gram)
        t = torch.cholesky_solve(x_a.transpose(1, 2) @ y, chol)  # (B, K_in, K_out)
        coef = t.transpose(1, 2)[:, :, :r]  # (B, K_out, R): column c <- input candidate c
        coef = coef / torch.linalg.vector_norm(coef, dim=1, keepdim=True).clamp_min(1e-12)
        ok = (info == 0) & torch.isfinite(coef).all(dim=(1, 2))
        return Selection(inp.in_rank[:, :r], inp.out_rank, coef, ok, self.name)

    def _against_gradient(self, y: torch.Tensor, inp: BuildInputs, keep: torch.Tensor) -> torch.Tensor:
        assert inp.grad is not None  # only called when a gradient was captured (see build)
        g = torch.gather(inp.grad.float().expand(y.shape[0], -1), 1, inp.out_rank)  # (B, K)
        n_y = keep.sum(dim=(1, 2)).clamp_min(1)
        rms_y = torch.sqrt((y * y).sum(dim=(1, 2)) / n_y)
        rms_g = torch.sqrt((g * g).mean(dim=1)).clamp_min(1e-30)
        eta = self.cfg.grad_eta * rms_y / rms_g
        return torch.where(keep, y - (eta[:, None] * g).unsqueeze(1), 0.0)


class HybridBuilder:
    """SC when a gradient for the layer's output is available, SK otherwise."""

    name = "hybrid"

    def __init__(self, cfg: VPSConfig) -> None:
        self.sk = SKBuilder(cfg)
        self.sc = SCBuilder(cfg)

    def build(self, inp: BuildInputs) -> Selection:
        """Dispatch on the presence of a captured gradient."""
        return (self.sc if inp.grad is not None else self.sk).build(inp)


_BUILDERS: dict[str, Callable[[VPSConfig], SKBuilder | SCBuilder | HybridBuilder]] = {
    "sk": SKBuilder, "sc": SCBuilder, "hybrid": HybridBuilder}


def make_builder(name: str, cfg: VPSConfig) -> SKBuilder | SCBuilder | HybridBuilder:
    """The builder registered under ``name`` ("sk" | "sc" | "hybrid")."""
    try:
        return _BUILDERS[name](cfg)
    except KeyError:
        raise ValueError(f"unknown builder {name!r}; known builders: {sorted(_BUILDERS)}") from None


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather features ``idx`` (B, K) from every token of ``t`` (B, T, d) -> (B, T, K)."""
    return torch.gather(t, 2, idx.unsqueeze(1).expand(-1, t.shape[1], -1))
