"""Per-layer gains: the perturbation's own small parameters, tuned across refinement iterations.

Every `VPSLinear` scales its perturbation by a scalar gain (1.0 at patch time; never part of the
model's weights or ``state_dict``). During a refinement step the loss is back-propagated to the gains,
and `GainOptimizer.step` moves them against the gradient. With ``lbfgs_enabled`` the gradient is first
preconditioned by the ephemeral L-BFGS memory (seed section 5), whose curvature pairs are the
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

from .lbfgs import EphemeralLBFGS
from .patching import get_config, vps_layers


class GainOptimizer:
    """L-BFGS-preconditioned (or plain) gradient steps on a patched model's per-layer gains."""

    def __init__(self, model: nn.Module, max_gain: float = 4.0) -> None:
        self.cfg = get_config(model)
        self.layers = list(vps_layers(model).values())
        self.max_gain = max_gain
        self.lbfgs = EphemeralLBFGS(m=self.cfg.lbfgs_m)
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None

    def gains(self) -> torch.Tensor:
        """Current gains, one per patched layer (float32)."""
        return torch.stack([layer.gain.detach().float().cpu() for layer in self.layers])

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

    def gradient(self) -> torch.Tensor:
        """The gains' gradients from the last backward pass (0 for a layer the loss did not reach)."""
        grads = [layer.gain.grad if layer.gain.grad is not None else torch.zeros(()) for layer in self.layers]
        return torch.nan_to_num(torch.stack([g.detach().float().cpu() for g in grads]))

    def step(self) -> dict[str, Any]:
        """Apply one update from the last gradient; returns a summary for the refinement trace."""
        x = self.gains()
        g = self.gradient()
        stored = False
        if self.cfg.lbfgs_enabled:
            if self._prev is not None:
                stored = self.lbfgs.update(x - self._prev[0], g - self._prev[1])
            try:
                direction = self.lbfgs.two_loop(g) if torch.isfinite(g).all() else torch.zeros_like(g)
            except FloatingPointError:  # curvature memory gone bad: forget it, take a plain step
                self.lbfgs.reset()
                direction = g
        else:
            direction = g
        new = (x - self.cfg.lbfgs_scale * direction).clamp(0.0, self.max_gain)
        self._prev = (x, g)
        for layer, value in zip(self.layers, new, strict=True):
            layer.gain = value.detach().to(layer.gain.device).clone()
            layer.gain.grad = None
        return {
            "grad_norm": float(g.norm()),
            "step_norm": float((new - x).norm()),
            "mean_gain": float(new.mean()),
            "lbfgs_pairs": len(self.lbfgs),
            "pair_stored": stored,
        }

    def reset(self) -> None:
        """Gains back to 1 and the curvature memory emptied."""
        self.lbfgs.reset()
        self._prev = None
        for layer in self.layers:
            layer.gain = torch.ones((), dtype=torch.float32)
