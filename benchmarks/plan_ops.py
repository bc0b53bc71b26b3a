#!/usr/bin/env python
"""How many tensor ops one patched layer adds to a prefill, split by the part of the plan that issues them.

Every op PyTorch dispatches (after composite ops decompose, views included) is counted under a
``TorchDispatchMode`` while the VPS functions are wrapped in labels: statistics, ranking, policy,
selection, clip and Q, applying the perturbation, the rest of the layer's plan code, and the
model-level hooks (mask, entropy). The figure per patched layer is (patched - unpatched) / layers,
from one prefill each, on a random-weight copy of a real architecture built from its config (the
counts do not depend on the weights). On a GPU nearly every non-view op is one kernel launch, so
this is the eager launch count the issue's "handful of kernels" is about.

    python benchmarks/plan_ops.py                         # SmolLM2-135M architecture, 1x512 and 8x128
    python benchmarks/plan_ops.py --pad --builder hybrid  # left padding: the masked statistics path
    python benchmarks/plan_ops.py --json out.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import vps
from vps import activation_stats as stats_mod
from vps import builders as builders_mod
from vps import coupling as coupling_mod
from vps import layer as layer_mod
from vps import planning as planning_mod
from vps import policy as policy_mod

# SmolLM2-135M's published shapes.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
PARTS = ("statistics", "ranking", "policy", "selection", "clip and Q", "apply", "layer (other)", "model hooks")


class _Counting(TorchDispatchMode):
    """Counts dispatched ops under the innermost active label, views apart."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = ["model"]
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.names: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[(self.labels[-1], "view" if func.is_view else "compute")] += 1
        self.names[(self.labels[-1], str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _labelled(mode: _Counting) -> Iterator[None]:
    """Swap the VPS hot-path functions for labelled wrappers for the duration of the block."""
    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mode.labels.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                mode.labels.pop()
        return wrapped

    targets: list[tuple[Any, str, str]] = [
        (stats_mod, "input_scores", "statistics"), (stats_mod, "output_scores", "statistics"),
        (planning_mod, "rank_features", "ranking"), (layer_mod, "rank_features", "ranking"),
        (coupling_mod, "rank_features", "ranking"),
        (policy_mod.LayerPolicy, "decide", "policy"),
        (builders_mod.SKBuilder, "build", "selection"), (builders_mod.SCBuilder, "build", "selection"),
        (planning_mod, "plan_matrix", "clip and Q"),
        (layer_mod.VPSLinear, "_apply_plan", "apply"),
        (layer_mod.VPSLinear, "forward", "layer (other)"),
        (torch.nn.Linear, "forward", "linear"),
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
    for owner, name, label in targets:
        setattr(owner, name, wrap(owner.__dict__[name], label))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def count_prefill(model: torch.nn.Module, batch: int, tokens: int, pad: bool) -> collections.Counter[tuple[str, str]]:
    """Op counts of one prefill (after one uncounted warm-up) by (label, view|compute)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens), generator=gen)
    mask = torch.ones_like(ids)
    if pad:  # left-pad every other row by a quarter of its length
        mask[::2, : tokens // 4] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        mode = _Counting()
        with _labelled(mode), mode:
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return mode.counts


def per_layer(base: collections.Counter[tuple[str, str]], patched: collections.Counter[tuple[str, str]],
              layers: int) -> dict[str, dict[str, float]]:
    """Ops per patched layer by part: labelled counts, plus the model-level difference as 'model hooks'."""
    out: dict[str, dict[str, float]] = {}
    for part in PARTS:
        row = {}
        for kind in ("compute", "view"):
            if part == "model hooks":
                n = patched[("model", kind)] - base[("model", kind)]
            else:
                n = patched[(part, kind)]
            row[kind] = n / layers
        out[part] = row
    out["total"] = {kind: sum(out[p][kind] for p in PARTS) for kind in ("compute", "view")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builder", default="sk", choices=["sk", "sc", "hybrid"])
    p.add_argument("--shapes", default="1x512,8x128", help="comma-separated BATCHxTOKENS prefills")
    p.add_argument("--pad", action="store_true", help="left-pad every other row (the masked statistics path)")
    p.add_argument("--json", help="also write the counts to this JSON file")
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s.strip()]
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--shapes: expected BATCHxTOKENS[,BATCHxTOKENS...], got {args.shapes!r}") from None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
    results = []
    for batch, tokens in shapes:
        base = count_prefill(model, batch, tokens, args.pad)
        with vps.patched(model, vps.VPSConfig(builder=args.builder)):
            layers = len(vps.vps_layers(model))
            patched = count_prefill(model, batch, tokens, args.pad)
        rows = per_layer(base, patched, layers)
        results.append({"shape": [batch, tokens], "pad": args.pad, "builder": args.builder,
                        "patched_layers": layers, "per_layer": rows})
        print(f"prefill {batch}x{tokens}{' (padded)' if args.pad else ''}, builder {args.builder}, "
              f"{layers} patched layers: ops per patched layer")
        print(f"  {'part':15s} {'compute':>8s} {'view':>6s}")
        for part, row in rows.items():
            print(f"  {part:15s} {row['compute']:8.1f} {row['view']:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
