"""Where a trial patches, in terms that hold for any architecture: which kind of layer, which third of the blocks.

`Placement.of(model)` reads the model's default targets once; `trial_config` turns a trial's
parameters into the `VPSConfig` it runs (explicit ``target_modules`` suffixes and ``layers``
indices, so the saved config means the same on a fresh load of the same model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, VPSConfig
from ..patching import select_targets
from .space import BLOCKS, MODULES, SpaceError

__all__ = ["Placement", "TrialConfig", "check_ranks", "trial_config"]

_BLOCK = re.compile(r"\.(\d+)\.")
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention)\.")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.")


@dataclass(frozen=True)
class Placement:
    """A model's default VPS targets, split by kind (as ``parent.child`` suffixes), and its block count."""

    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    n_blocks: int

    @classmethod
    def of(cls, model: nn.Module) -> Placement:
        """Read the placement of ``model`` from the layers `vps.patch` targets by default."""
        names = select_targets(model, VPSConfig(qk_coupling=False))
        attention, mlp, blocks = set(), set(), set()
        for name in names:
            suffix = ".".join(name.split(".")[-2:])
            if _ATTENTION.search(name):
                attention.add(suffix)
            elif _MLP.search(name):
                mlp.add(suffix)
            found = _BLOCK.search(name)
            if found is not None:
                blocks.add(int(found.group(1)))
        return cls(tuple(sorted(attention)), tuple(sorted(mlp)), max(blocks) + 1 if blocks else 0)

    def check(self, modules: tuple[Any, ...], blocks: tuple[Any, ...], source: str = "space") -> None:
        """Refuse, before any trial, a placement choice this model cannot honour."""
        if "attention" in modules and not self.attention:
            raise SpaceError(f"{source}: key 'modules': this model has no attention layers among its targets")
        if "mlp" in modules and not self.mlp:
            raise SpaceError(f"{source}: key 'modules': this model has no MLP layers among its targets")
        if any(b != "all" for b in blocks) and self.n_blocks < 3:
            raise SpaceError(f"{source}: key 'blocks': the model has {self.n_blocks} block(s), too few for thirds")

    def targets(self, modules: str) -> list[str] | None:
        """``target_modules`` for a ``modules`` choice (None: the architecture's default)."""
        if modules == "all":
            return None
        return list(self.attention if modules == "attention" else self.mlp)

    def layers(self, blocks: str) -> list[int] | None:
        """``layers`` for a ``blocks`` choice: the first, middle or last third (the last takes any extra)."""
        if blocks == "all":
            return None
        third = self.n_blocks // 3
        start = {"early": 0, "middle": third, "late": 2 * third}[blocks]
        stop = {"early": third, "middle": 2 * third, "late": self.n_blocks}[blocks]
        return list(range(start, stop))


@dataclass(frozen=True)
class TrialConfig:
    """A trial's configuration and its labels (damping: gamma below zero)."""

    config: VPSConfig
    damping: bool

    @property
    def labels(self) -> list[str]:
        return ["DAMPING"] if self.damping else []


def trial_config(params: dict[str, Any], placement: Placement) -> TrialConfig:
    """The `VPSConfig` a trial runs. ``topk`` widens to the rank where a trial draws it smaller (the
    candidate pool must hold the rank); a negative gamma becomes ``damping`` with gamma's magnitude."""
    fields = {k: v for k, v in params.items() if k not in ("modules", "blocks")}
    modules, blocks = params.get("modules", "all"), params.get("blocks", "all")
    if modules not in MODULES or blocks not in BLOCKS:
        raise SpaceError(f"modules must be one of {MODULES} and blocks one of {BLOCKS}, got {modules!r}, {blocks!r}")
    if "topk" in fields:  # a drawn topk is the pool's floor: widened to a drawn rank beyond it, never refused
        fields["topk"] = VPSConfig.pool_for(fields.get("rank", VPSConfig.rank), fields["topk"])
    targets, layers = placement.targets(modules), placement.layers(blocks)
    if targets is not None:
        fields["target_modules"] = targets
    if layers is not None:
        fields["layers"] = layers
    # No source: a refused trial's message is recorded in trials.jsonl as it always read.
    config = VPSConfig.from_overrides(fields, allow_damping=True)
    return TrialConfig(config, config.damping)


def check_ranks(model: nn.Module, cfg: VPSConfig) -> None:
    """Refuse (`ConfigError`) a configuration whose largest rank exceeds ``min(d_in, d_out)`` of a layer it
    patches, which `VPSLinear` would refuse when patching. Checked before the trial, so that it is recorded
    as a refused configuration, while any error raised inside patching or scoring is raised, not recorded."""
    for name in select_targets(model, cfg):
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)  # select_targets keeps nn.Linear and Conv1D layers only
        smallest = min(weight.shape)  # (out, in) for Linear, (in, out) for Conv1D
        if cfg.max_rank > smallest:
            raise ConfigError(f"rank {cfg.max_rank} exceeds min(d_in, d_out) = {smallest} of layer {name}")
