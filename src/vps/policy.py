"""The adaptive policy (docs/design.md §4): how much perturbation each forward of a layer gets.

One `LayerPolicy` per patched layer. Each forward it turns per-sequence statistics into a
`Decision` (sigma, rank, top-k, gamma, order), all as tensors so nothing syncs with the host:

1. energy: ``E = mean(h^2)`` of the layer's base output over the sequence's valid tokens,
   ``sigma = 1 - exp(-E)``;
2. entropy: with the previous forward's next-token entropy ``H`` of the same sequence,
   ``sigma = max(sigma, min(1, H / 3))`` (see `vps.context` for when H is available);
3. improvement history: ``update_outcome(improved, loss_delta)`` keeps the last ``history_size``
   outcomes. The trailing *streak* s counts consecutive equal outcomes at the end of the history
   (+n for n improvements in a row, -n for n failures). From two in a row on,
   ``sigma += history_step * s`` (clamped to [0, 1]): repeated improvement raises sigma, repeated
   failure lowers it, one outcome alone does nothing. Sequences refined together as one batch
   (`vps.refine_many`) each keep their own history and streak;
4. interpolation: ``value = lo + (hi - lo) * sigma`` within the config's bounds for rank, top-k,
   gamma and order, where the matching ``adaptive_*`` flag is on (integers are rounded to nearest).

Non-finite E or H are treated as "no evidence" (E -> 0 contributes sigma 0, H ignored), so a decision
is always finite.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import VPSConfig
from .dtypes import as_float32, constant


@dataclass
class Decision:
    """Per-sequence policy decision; every field is a tensor of shape (B,)."""

    sigma: torch.Tensor
    rank: torch.Tensor
    topk: torch.Tensor
    gamma: torch.Tensor
    order: torch.Tensor
    energy: torch.Tensor
    entropy: torch.Tensor | None


class LayerPolicy:
    """Adaptive policy state of one patched layer (its improvement history)."""

    def __init__(self, cfg: VPSConfig) -> None:
        self.cfg = cfg
        self.history: deque[tuple[tuple[bool, ...], tuple[float, ...]]] = deque(maxlen=cfg.history_size)
        self._bounds_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- improvement history --------------------------------------------------------------------
    def update_outcome(self, improved: bool | Sequence[bool], loss_delta: float | Sequence[float] = 0.0) -> None:
        """Record whether the last refinement step improved the verifier loss (and by how much).

        One value for one sequence (or for every sequence alike); a sequence of values records one
        outcome per sequence of a batch refined together. Every entry of a history has the same width.
        """
        flags = (bool(improved),) if isinstance(improved, (bool, int)) else tuple(bool(v) for v in improved)
        deltas = ((float(loss_delta),) * len(flags) if isinstance(loss_delta, (int, float))
                  else tuple(float(v) for v in loss_delta))
        if len(deltas) != len(flags) or not flags:
            raise ValueError(f"update_outcome: {len(flags)} outcome(s) but {len(deltas)} loss delta(s)")
        if self.history and len(self.history[-1][0]) != len(flags):
            raise ValueError(f"update_outcome: this history records {len(self.history[-1][0])} sequence(s), "
                             f"got {len(flags)} outcome(s); reset() first")
        self.history.append((flags, deltas))

    def reset(self) -> None:
        """Forget the improvement history."""
        self.history.clear()

    @property
    def streaks(self) -> list[int]:
        """Per sequence, the signed length of the trailing run of equal outcomes (+ improvements, - failures)."""
        if not self.history:
            return []
        out = []
        for i, last in enumerate(self.history[-1][0]):
            n = 0
            for flags, _ in reversed(self.history):
                if flags[i] != last:
                    break
                n += 1
            out.append(n if last else -n)
        return out

    @property
    def streak(self) -> int:
        """The trailing run of a one-sequence history (see `streaks`); 0 when empty."""
        s = self.streaks
        if len(s) > 1:
            raise ValueError(f"this history records {len(s)} sequences; use streaks")
        return s[0] if s else 0

    @property
    def history_bias(self) -> float:
        """Additive change to sigma from a one-sequence history (0 until an outcome repeats)."""
        return self._streak_bias(self.streak)

    def _streak_bias(self, s: int) -> float:
        return self.cfg.history_step * s if abs(s) >= 2 else 0.0

    def bias_for(self, batch: int) -> float | torch.Tensor:
        """The history's change to sigma for a forward of ``batch`` sequences.

        A one-sequence history applies to every sequence; a per-sequence history to the batch it was
        recorded for, row by row. Sequences it was not recorded for (another batch size) get none.
        """
        streaks = self.streaks
        if len(streaks) <= 1:
            return self.history_bias
        if len(streaks) != batch:
            return 0.0
        return torch.tensor([self._streak_bias(s) for s in streaks])

    # -- decisions --------------------------------------------------------------------------------
    def sigma(self, energy: torch.Tensor, entropy: torch.Tensor | None = None,
              bias: float | torch.Tensor | None = None) -> torch.Tensor:
        """sigma in [0, 1] per sequence from energy, entropy and the history rule.

        ``bias`` is the history's change to sigma when the caller has read it already (`bias_for`):
        a compiled plan reads the history outside its graph, so the graph never guards on it.
        """
        energy = as_float32(energy)
        # fmax ignores a NaN: NaN and anything below 0 become 0 in one op (+inf stays, giving sigma 1).
        energy = torch.fmax(energy, constant(0.0, torch.float32, energy.device))
        sig = 1.0 - torch.exp(-energy)  # in [0, 1] already: energy >= 0 here (+inf gives exactly 1)
        if entropy is not None and self.cfg.use_entropy:
            h = torch.nan_to_num(entropy.float(), nan=0.0, posinf=3.0, neginf=0.0).clamp_min(0.0)
            sig = torch.maximum(sig, torch.clamp(h / 3.0, max=1.0))
        if bias is None:
            bias = self.bias_for(sig.shape[0])
        if isinstance(bias, torch.Tensor):
            return (sig + bias.to(sig.device)).clamp(0.0, 1.0)
        if bias:
            return (sig + bias).clamp(0.0, 1.0)
        return sig

    def decide(self, energy: torch.Tensor, entropy: torch.Tensor | None = None,
               bias: float | torch.Tensor | None = None) -> Decision:
        """The decision for one forward; ``energy`` and ``entropy`` are (B,) tensors, ``bias`` as in `sigma`."""
        sig = self.sigma(energy, entropy, bias)
        lo, span = self._bounds(sig.device)
        # One product for all four knobs: columns are rank, top-k, gamma, order.
        values = torch.addcmul(lo, span, sig.unsqueeze(-1))
        ints = torch.round(values).long()
        return Decision(sigma=sig, rank=ints[:, 0], topk=ints[:, 1], gamma=values[:, 2], order=ints[:, 3],
                        energy=energy, entropy=entropy)

    def _bounds(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = None if torch.compiler.is_compiling() else self._bounds_cache
        # A compiled forward builds the bounds from constants in the graph: a cache filled on the first
        # call would be a guard that the second prefill fails (one recompilation more).
        if cached is None or cached[0].device != device:
            cfg = self.cfg
            pairs = [cfg.resolved_rank_bounds, cfg.resolved_topk_bounds, cfg.resolved_gamma_bounds,
                     cfg.resolved_order_bounds]
            lo = torch.tensor([float(p[0]) for p in pairs], device=device)
            span = torch.tensor([float(p[1]) - float(p[0]) for p in pairs], device=device)
            cached = (lo, span)
            if not torch.compiler.is_compiling():
                self._bounds_cache = cached
        return cached
