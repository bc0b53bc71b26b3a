"""Per-layer gains: the perturbation's own small parameters, tuned across refinement iterations.

Every `VPSLinear` scales its perturbation by a scalar gain (1.0 at patch time; never part of the
model's weights or ``state_dict``). During a refinement step the loss is back-propagated to the gains,
and `GainOptimizer.step` moves them against the gradient. With ``lbfgs_enabled`` the gradient is first
preconditioned by the ephemeral L-BFGS memory (docs/design.md §5), whose curvature pairs are the
successive gain steps and gradient changes; without it the step is plain gradient scaling. Both are
scaled by ``lbfgs_scale`` (1e-3 by default, as the seed describes). Gains are clamped to
``[0, max_gain]`` so a step can weaken or strengthen a layer's perturbation but never flip its sign.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..patching import get_config, vps_layers
from .lbfgs import EphemeralLBFGS


class GainOptimizer:
    """L-BFGS-preconditioned (or plain) gradient steps on a patched model's per-layer gains.

    By default every layer has one scalar gain. With ``batch=B`` each layer holds one gain per
    sequence of a batch refined together (shape (B,), set to 1 here), each sequence with its own
    L-BFGS memory: sequences of a batch are independent, so the gradient of the summed loss with
    respect to sequence b's gains is that of sequence b's own loss.
    """

    def __init__(self, model: nn.Module, max_gain: float = 4.0, batch: int | None = None) -> None:
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.cfg = get_config(model)
        self.layers = list(vps_layers(model).values())
        self.max_gain = max_gain
        self.batch = batch
        columns = 1 if batch is None else batch
        self._lbfgs = [EphemeralLBFGS(m=self.cfg.lbfgs_m) for _ in range(columns)]
        self._prev: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * columns
        if batch is not None:
            for layer in self.layers:
                layer.reset_gain(batch)

    @property
    def lbfgs(self) -> EphemeralLBFGS:
        """The curvature memory (of the first sequence, with ``batch``)."""
        return self._lbfgs[0]

    def _columns(self, values: list[torch.Tensor]) -> torch.Tensor:
        # (L, C): one column per sequence (C = 1 for scalar gains)
        return torch.stack([v.detach().float().cpu().reshape(-1) for v in values])

    def _shaped(self, mat: torch.Tensor) -> torch.Tensor:
        return mat[:, 0] if self.batch is None else mat

    def gains(self) -> torch.Tensor:
        """Current gains (float32): (layers,), or (layers, batch) with per-sequence gains."""
        return self._shaped(self._columns([layer.gain for layer in self.layers]))

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """Inside the block the gains are autograd leaves, so a backward pass reaches them."""
        for layer in self.layers:
            layer.gain = layer.gain.detach().clone().requires_grad_(True)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.gain.requires_grad_(False)

    def _gradient(self) -> torch.Tensor:
        grads = [layer.gain.grad if layer.gain.grad is not None else torch.zeros_like(layer.gain)
                 for layer in self.layers]
        return torch.nan_to_num(self._columns(grads))

    def gradient(self) -> torch.Tensor:
        """The gains' gradients from the last backward pass (0 for a layer the loss did not reach)."""
        return self._shaped(self._gradient())

    def step(self) -> dict[str, Any] | list[dict[str, Any]]:
        """Apply one update from the last gradient; returns a summary for the refinement trace.

        With per-sequence gains, one summary per sequence.
        """
        x_all = self._columns([layer.gain for layer in self.layers])
        g_all = self._gradient()
        new_all = torch.empty_like(x_all)
        infos = []
        for c in range(x_all.shape[1]):
            new_all[:, c], info = self._step_column(c, x_all[:, c], g_all[:, c])
            infos.append(info)
        for i, layer in enumerate(self.layers):
            value = new_all[i, 0] if self.batch is None else new_all[i]
            layer.gain = value.detach().to(layer.gain.device).clone()
            layer.gain.grad = None
        return infos[0] if self.batch is None else infos

    def _step_column(self, c: int, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        lbfgs = self._lbfgs[c]
        stored = False
        if self.cfg.lbfgs_enabled:
            prev = self._prev[c]
            if prev is not None:
                stored = lbfgs.update(x - prev[0], g - prev[1])
            try:
                direction = lbfgs.two_loop(g) if torch.isfinite(g).all() else torch.zeros_like(g)
            except FloatingPointError:  # curvature memory gone bad: forget it, take a plain step
                lbfgs.reset()
                direction = g
        else:
            direction = g
        new = (x - self.cfg.lbfgs_scale * direction).clamp(0.0, self.max_gain)
        self._prev[c] = (x, g)
        return new, {
            "grad_norm": float(g.norm()),
            "step_norm": float((new - x).norm()),
            "mean_gain": float(new.mean()),
            "lbfgs_pairs": len(lbfgs),
            "pair_stored": stored,
        }

    def reset(self) -> None:
        """Gains back to 1 and the curvature memory emptied."""
        for lbfgs in self._lbfgs:
            lbfgs.reset()
        self._prev = [None] * len(self._prev)
        for layer in self.layers:
            layer.reset_gain(self.batch)
