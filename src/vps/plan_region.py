"""The plan as a nested compile region: how a whole ``torch.compile`` of a patched model traces each
patched layer's plan once per shape class and config instead of inlining its ops into every layer.

A patched layer calls `plan_region` (with its key first) instead of `vps.planning.plan_tensors` only while
its forward is being traced; eagerly it calls `plan_tensors` itself. Compile times are in BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .builders import HybridBuilder, SCBuilder, SKBuilder, make_builder
from .config import VPSConfig
from .planning import PlanParts, PlanSpec, plan_tensors
from .policy import LayerPolicy

# A nested compile region is reused only when its inputs are tensors and constants and its outputs plain
# tensors. A layer's Python objects (spec, policy, builder) hold nothing but its config's constants for
# `plan_tensors`, so the region takes a constant key instead and finds one representative of each here,
# registered when a layer is made (never while tracing: a region that reads a dict mutated in the same
# trace is not reused).
_REGION_OWNERS: dict[tuple[Any, ...], tuple[PlanSpec, LayerPolicy, SKBuilder | SCBuilder | HybridBuilder]] = {}

# The fields of `PlanParts` that `plan_tensors` always makes afresh: Q and A, the large ones. A region's
# outputs may not alias its inputs or each other, and the small (B, ...) fields can (the shared input
# ranking and its first R entries, the coupling's out_rank and energy, the policy's expanded decisions),
# so every other field leaves the region as a copy.
_FRESH = frozenset({"q", "a_fold"})


def region_key(spec: PlanSpec, cfg: VPSConfig) -> tuple[Any, ...]:
    """The key of the region that plans for a layer with these constants, registering the layer's
    config under it; made when the layer is made."""
    # repr, not hash: a config may hold lists (target_modules). Equal reprs plan alike.
    key = (spec.topk, spec.transposed, spec.tau, spec.max_order, spec.damping, repr(cfg))
    if key not in _REGION_OWNERS:
        _REGION_OWNERS[key] = (spec, LayerPolicy(cfg), make_builder(cfg.builder, cfg))
    return key


def _plan_tensors_in_region(key: tuple[Any, ...], *args: Any) -> tuple[torch.Tensor, ...]:
    """`plan_tensors` for the layers registered under ``key``; ``args`` are its tensor arguments."""
    spec, policy, builder = _REGION_OWNERS[key]
    parts = plan_tensors(spec, policy, builder, *args)
    # None leaves as an empty tensor (a region returns tensors only, none aliasing another); no present
    # field is ever empty.
    return tuple(args[0].new_empty(0) if t is None else t if name in _FRESH else t.clone()
                 for name, t in zip(parts._fields, parts, strict=True))


def _make_plan_region() -> Callable[..., PlanParts]:
    nested = getattr(torch.compiler, "nested_compile_region", None)
    if nested is None:
        return lambda _key, *args: plan_tensors(*args)
    region = nested(_plan_tensors_in_region)

    def plan_in_region(key: tuple[Any, ...], _spec: PlanSpec, _policy: LayerPolicy,
                       _builder: SKBuilder | SCBuilder | HybridBuilder, *args: Any) -> PlanParts:
        # The layer's spec, policy and builder stay outside: the region finds their equals by key.
        out = region(key, *args)
        return PlanParts._make(None if t.numel() == 0 else t for t in out)

    return plan_in_region


# Made when the module is imported: dynamo refuses to trace nested_compile_region itself, and reuses a
# region by its function, so there is one for the process.
_PLAN_REGION = _make_plan_region()


def plan_region() -> Callable[..., PlanParts]:
    """`plan_tensors` as a nested compile region (``torch.compiler.nested_compile_region``), which a
    patched layer calls, with its region key first, while its forward is traced as a whole by
    ``torch.compile``: the region is compiled once per shape class and config and stamped out for every
    patched layer of that class, so compiling a patched model no longer inlines the plan's ops once per
    patched layer (compile times in BENCHMARKS.md). Before torch 2.8 (no nested regions) it runs
    `plan_tensors` itself, inlined into every layer's graph."""
    return _PLAN_REGION
