#!/usr/bin/env python
"""Where does torch.compile break on a patched model? Graph and graph-break counts of one patched
prefill under ``torch._dynamo.explain``, with each distinct reason and the line it comes from.

    python benchmarks/compile_breaks.py            # tiny Llama built in code, SK builder
    python benchmarks/compile_breaks.py --builder hybrid --unpatched

The starting point for a compile-ready VPS path: the target is one graph and no breaks in prefill and
in frozen decode.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vps  # noqa: E402
from tiny import ids, tiny_llama  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builder", default="sk", choices=["sk", "sc", "hybrid"])
    p.add_argument("--unpatched", action="store_true", help="explain the unpatched model instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = tiny_llama()
    x = ids(2, 12)
    mask = torch.ones_like(x)
    if not args.unpatched:
        vps.patch(model, vps.VPSConfig(builder=args.builder))

    def prefill(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    exp = torch._dynamo.explain(prefill)(x, mask)
    print(f"graphs {exp.graph_count}, graph breaks {exp.graph_break_count}")
    reasons: collections.Counter[str] = collections.Counter()
    for b in exp.break_reasons:
        where = b.user_stack[-1] if b.user_stack else None
        place = f"{Path(where.filename).name}:{where.lineno} in {where.name}" if where else "?"
        reasons[f"{str(b.reason).splitlines()[0][:110]} @ {place}"] += 1
    for reason, n in reasons.most_common():
        print(f"{n:3d} x {reason}")


if __name__ == "__main__":
    main()
