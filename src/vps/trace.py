"""Inspection: what the policy and builders decided in each patched layer's last plan."""

from __future__ import annotations

from typing import Any

from torch import nn

from .patching import vps_layers


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
    """One line a person can read: mean sigma / gamma / rank and builders used."""
    s = summarize(model)
    if not s["layers"]:
        return "vps: no layer has run yet"
    builders = ", ".join(f"{k}={v}" for k, v in sorted(s["builders"].items()))
    return (f"vps: {s['layers']} layers  sigma={s['sigma']:.3f}  gamma={s['gamma']:.3f}  rank={s['rank']:.2f}  "
            f"order={s['order']:.2f}  builders[{builders}]  fallbacks={s['fallbacks']}")
