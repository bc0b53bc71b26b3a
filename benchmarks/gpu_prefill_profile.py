#!/usr/bin/env python
"""Where a patched prefill spends its time on a GPU: kernel launches, host-blocking copies, top ops.

Times one 1x512 prefill of the unpatched and the SK-patched model (means of 5 after 3 warm-ups),
then profiles one of each with torch.profiler and prints the number of kernel launches, the GPU's
busy time, the host-blocking calls (synchronisations and copies) and the ops by host time. A launch-
bound forward shows many launches and a GPU busy for a fraction of the wall time.

    python benchmarks/gpu_prefill_profile.py --model /tmp/smollm2-135m
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import vps
from vps.models import load_model

BLOCKING = ("aten::item", "aten::_local_scalar_dense", "cudaMemcpyAsync", "aten::nonzero")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="anything vps.load_model accepts (default: the bundled model)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rows", type=int, default=22, help="ops to list per profile")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    model, _ = load_model(args.model, device="cuda")
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), device="cuda")
    mask = torch.ones_like(ids)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()

    for patched in (False, True):
        if patched:
            vps.patch(model, vps.VPSConfig(builder="sk"))
        for _ in range(3):
            forward()
        start = time.perf_counter()
        for _ in range(5):
            forward()
        label = "patched (sk)" if patched else "base"
        print(f"{label}: {(time.perf_counter() - start) / 5 * 1e3:.1f} ms per 1x{args.tokens} prefill")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward()
        ops = prof.key_averages()
        busy = sum(e.self_device_time_total for e in ops) / 1e3
        launches = sum(e.count for e in ops if e.key in LAUNCHES)
        blocking = {e.key: e.count for e in ops if "ynchronize" in e.key or e.key in BLOCKING}
        print(f"  kernel launches {launches}, GPU busy {busy:.1f} ms, host-blocking calls {blocking}")
        print(ops.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
