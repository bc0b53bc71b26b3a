#!/usr/bin/env python
"""Where does torch.compile break on a patched model? Graph and graph-break counts of one patched
prefill and one frozen decode step under ``torch._dynamo.explain`` (inference, as ``generate()``
runs), with each distinct reason and the line it comes from.

    python benchmarks/compile_breaks.py            # tiny Llama built in code, Hybrid builder
    python benchmarks/compile_breaks.py --builder sk --unpatched
    python benchmarks/compile_breaks.py --grad     # with autograd on (gradient capture)

The target is one graph and no breaks in prefill and in frozen decode (tests/core/test_compile.py holds
it there). With ``--grad`` the Hybrid/SC gradient capture sets a Python attribute from a backward
hook, which dynamo does not trace: a compiled forward that should feed SC is an eager-only use.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.tiny import ids, tiny_llama  # noqa: E402

import vps  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--builder", default="hybrid", choices=["sk", "sc", "hybrid"])
    p.add_argument("--unpatched", action="store_true", help="explain the unpatched model instead")
    p.add_argument("--grad", action="store_true", help="trace with autograd enabled (training / refinement)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = tiny_llama()
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding: the masked statistics path
    if not args.unpatched:
        vps.patch(model, vps.VPSConfig(builder=args.builder))

    def prefill(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=x, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)

    def decode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache).logits

    step_mask = torch.cat([mask, torch.ones_like(first)], dim=1)
    for name, fn, args_ in (("prefill", prefill, (x, mask)), ("frozen decode", decode, (first, step_mask))):
        torch._dynamo.reset()
        with torch.set_grad_enabled(args.grad):
            exp = torch._dynamo.explain(fn)(*args_)
        print(f"{name}: graphs {exp.graph_count}, graph breaks {exp.graph_break_count}")
        reasons: collections.Counter[str] = collections.Counter()
        for b in exp.break_reasons:
            where = b.user_stack[-1] if b.user_stack else None
            place = f"{Path(where.filename).name}:{where.lineno} in {where.name}" if where else "?"
            reasons[f"{str(b.reason).splitlines()[0][:110]} @ {place}"] += 1
        for reason, n in reasons.most_common():
            print(f"  {n:3d} x {reason}")

if __name__ == "__main__":
    main()
