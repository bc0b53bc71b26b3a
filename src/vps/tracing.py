"""Inspection: what the policy and builders decided in each patched layer's last plan."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .patching import get_context, vps_layers


def trace(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per patched layer, the last decision as plain Python values.

    Keys: sigma, rank, topk, gamma, order, energy, entropy (per sequence lists), builder,
    in_idx, out_idx (selected features per sequence), gain (a list with per-sequence gains) and
    fallbacks. Layers that have not run yet report only gain and fallbacks.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, layer in vps_layers(model).items():
        gain = layer.gain.detach()
        row: dict[str, Any] = {"gain": float(gain) if gain.dim() == 0 else gain.tolist(), "fallbacks": layer.fallbacks}
        plan = layer.plan
        if plan is not None:
            d = plan.decision
            row.update(
                sigma=d.sigma.tolist(), rank=d.rank.tolist(), topk=d.topk.tolist(), gamma=d.gamma.tolist(),
                order=d.order.tolist(), energy=d.energy.tolist(),
                entropy=None if d.entropy is None else d.entropy.tolist(),
                builder=plan.selection.builder, in_idx=plan.selection.in_idx.tolist(),
                out_idx=plan.out_idx.tolist(),
            )
        out[name] = row
    return out


class FallbackCount:
    """Per sequence, how many plans fell back to the base output inside a `count_fallbacks` block."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.per_sequence: list[int] = [0] * batch

    def add(self, flags: list[torch.Tensor]) -> None:
        for ok in flags:
            missed = (~ok).to("cpu", torch.long)
            if missed.numel() == 1:  # batch scope: one plan shared by every sequence
                missed = missed.expand(self.batch)
            elif missed.numel() != self.batch:
                raise ValueError(f"count_fallbacks was opened for {self.batch} sequences, and a forward inside it "
                                 f"ran {missed.numel()}")
            self.per_sequence = [a + int(b) for a, b in zip(self.per_sequence, missed.tolist(), strict=True)]


@contextlib.contextmanager
def count_fallbacks(model: nn.Module, batch: int) -> Iterator[FallbackCount]:
    """Count, per sequence of a ``batch``-row input, the plans that fell back to the base output in the block
    (a layer whose selection or clip failed for that sequence; each forward that builds plans counts anew).

    The evaluation rows carry it, so a "VPS" row that was mostly the base model says so. Eager forwards only:
    a compiled forward counts into the layers' totals (`trace`), not here.
    """
    ctx = get_context(model)
    if ctx.fallback_flags is not None:
        raise RuntimeError("count_fallbacks blocks do not nest")
    count = FallbackCount(batch)
    ctx.fallback_flags = []
    try:
        yield count
    finally:
        flags, ctx.fallback_flags = ctx.fallback_flags, None
    count.add(flags)


def summarize(model: nn.Module) -> dict[str, Any]:
    """Means over the patched layers (and sequences) of sigma, gamma and rank; builder counts."""
    return _summary(list(trace(model).values()), None)


def summarize_sequences(model: nn.Module, batch: int) -> list[dict[str, Any]]:
    """`summarize` per sequence of the last ``batch``-sequence forward (a batch refined together), from one trace."""
    every = list(trace(model).values())
    return [_summary(every, i) for i in range(batch)]


def _summary(every: list[dict[str, Any]], sequence: int | None) -> dict[str, Any]:
    rows = [r for r in every if "sigma" in r]
    if not rows:
        return {"layers": 0}
    def mean(key: str) -> float:
        vals = [v for r in rows for v in (r[key] if sequence is None else r[key][sequence: sequence + 1])]
        return sum(vals) / len(vals)
    builders: dict[str, int] = {}
    for r in rows:
        builders[r["builder"]] = builders.get(r["builder"], 0) + 1
    return {
        "layers": len(rows), "sigma": mean("sigma"), "gamma": mean("gamma"), "rank": mean("rank"),
        "order": mean("order"), "builders": builders,
        "fallbacks": sum(r["fallbacks"] for r in every),
    }


def format_summary(model: nn.Module) -> str:
    """What the policy decided, in words a person can read: means over the patched layers' last plans."""
    from .patching import get_config

    s = summarize(model)
    if not s["layers"]:
        return "vps: no layer has run yet"
    cfg = get_config(model)
    g_hi, r_hi = cfg.resolved_gamma_bounds[1], cfg.resolved_rank_bounds[1]
    builders = ", ".join(f"{k} in {v}" for k, v in sorted(s["builders"].items()))
    why = ""
    if cfg.builder == "hybrid" and set(s["builders"]) == {"sk"}:
        why = " (hybrid uses sc only where a gradient was captured; plain generation captures none)"
    return (f"vps: {s['layers']} layers; policy strength sigma={s['sigma']:.3f} (0 = none, 1 = full); "
            f"mean gamma={s['gamma']:.3f} (of at most {g_hi:g}), rank={s['rank']:.2f} (of at most {r_hi}), "
            f"order={s['order']:.2f}; selectors built by {builders}{why}; fallbacks to the base output: "
            f"{s['fallbacks']}")
