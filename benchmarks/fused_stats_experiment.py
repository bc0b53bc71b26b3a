#!/usr/bin/env python
"""What would a fused statistics kernel buy? (an overhead question: "what would it take").

An experiment, not part of the library. In one process it interleaves prefill timings of

- ``base``: the unpatched model;
- ``sk``: VPS with the SK builder as shipped (eager statistics: ``abs``, token sum, energy);
- ``sk+fused``: the same, with the activation statistics replaced by a single-pass C++ kernel
  (compiled here with ``torch.utils.cpp_extension.load_inline``; needs g++ and ninja), which reads
  each activation once instead of about four times;
- ``floor``: the rank-2 term alone — the plans of a first forward reused by every later forward
  (`vps.reuse_selection`), i.e. the base forward plus one gather and one ``baddbmm`` per layer.

It prints each as a median ratio to ``base`` and writes the timings as JSON. The kernel is checked
against the eager statistics before anything is timed.

    python benchmarks/fused_stats_experiment.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from vps import VPSConfig, patch, reuse_selection, unpatch
from vps import activation_stats as stats_mod
from vps import layer as layer_mod
from vps.bench import make_inputs, time_prefill
from vps.context import TokenMask
from vps.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"

KERNEL = r"""
#include <torch/extension.h>
#include <cmath>
#include <vector>

// Per sequence b: s[b, d] = sum over valid tokens t of |h[b, t, d]|, e[b] = sum over valid t, d of h^2.
// One pass over h; the (d)-long accumulators stay in L1.
std::vector<torch::Tensor> column_stats(torch::Tensor h, torch::Tensor mask, bool dense) {
  TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.dim() == 3, "h: contiguous float32 (B, T, D)");
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  auto s = torch::zeros({B, D}, h.options());
  auto e = torch::zeros({B}, h.options());
  std::vector<float> sq(D);
  const float* hp = h.data_ptr<float>();
  torch::Tensor m = dense ? mask : mask.contiguous();
  const bool* mp = dense ? nullptr : m.data_ptr<bool>();
  for (int64_t b = 0; b < B; b++) {
    float* sp = s.data_ptr<float>() + b * D;
    float* q = sq.data();
    std::fill(sq.begin(), sq.end(), 0.f);
    for (int64_t t = 0; t < T; t++) {
      if (mp && !mp[b * T + t]) continue;
      const float* r = hp + (b * T + t) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; d++) { float v = r[d]; sp[d] += std::fabs(v); q[d] += v * v; }
    }
    double total = 0;
    for (int64_t d = 0; d < D; d++) total += q[d];
    e.data_ptr<float>()[b] = (float)total;
  }
  return {s, e};
}
"""


def compile_kernel() -> Any:
    missing = [tool for tool in ("g++", "ninja") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"this experiment compiles a C++ kernel and needs {' and '.join(missing)} on PATH")
    from torch.utils.cpp_extension import load_inline

    return load_inline("vps_fused_stats_experiment", cpp_sources=KERNEL, functions=["column_stats"],
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp-simd"])


def fused_scores(kernel: Any) -> tuple[Any, Any]:
    """Drop-in replacements for `vps.activation_stats.input_scores` / `output_scores` built on the kernel."""
    def input_scores(x: torch.Tensor, tm: TokenMask) -> torch.Tensor:
        s, _ = kernel.column_stats(x.contiguous(), tm.valid, tm.pad is None)
        return s

    def output_scores(h: torch.Tensor, tm: TokenMask) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = kernel.column_stats(h.contiguous(), tm.valid, tm.pad is None)
        return s, e / (tm.count * h.shape[2])

    return input_scores, output_scores


def check_kernel(fused_in: Any, fused_out: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 17, 40, generator=gen)
    mask = torch.rand(3, 17, generator=gen) > 0.3
    dense = TokenMask(torch.ones_like(mask), None, float(h.shape[1]))
    masked = TokenMask(mask, ~mask.unsqueeze(-1), mask.sum(dim=1).clamp_min(1).float())
    for tm in (dense, masked):
        torch.testing.assert_close(fused_in(h, tm), stats_mod.input_scores(h, tm))
        for got, want in zip(fused_out(h, tm), stats_mod.output_scores(h, tm), strict=True):
            torch.testing.assert_close(got, want)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None, help="alias, directory or .gguf (default: the bundled model)")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/<time>-fused-stats.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fused_in, fused_out = fused_scores(compile_kernel())
    check_kernel(fused_in, fused_out)
    eager = (stats_mod.input_scores, stats_mod.output_scores)
    model, _ = load_model(args.model)
    model.eval()
    variants = ("base", "sk", "sk+fused", "floor")
    result: dict[str, Any] = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "argv": sys.argv[1:] if argv is None else argv, "threads": args.threads,
                              "torch": torch.__version__, "shapes": {}}
    for b, t in ((1, 512), (8, 128)):
        ids, mask = make_inputs(model, b, t, 0)
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for v in variants:
                if _patched(model):
                    unpatch(model)
                stats_mod.input_scores, stats_mod.output_scores = (fused_in, fused_out) if v == "sk+fused" else eager
                if v == "base":
                    took = time_prefill(model, ids, mask)
                else:
                    patch(model, VPSConfig(builder="sk"))
                    if v == "floor":
                        time_prefill(model, ids, mask)  # builds the plans the timed forward reuses
                        with reuse_selection(model):
                            took = time_prefill(model, ids, mask)
                    else:
                        took = time_prefill(model, ids, mask)
                if rnd:
                    times[v].append(took)
        stats_mod.input_scores, stats_mod.output_scores = eager
        base = statistics.median(times["base"])
        ratios = {v: statistics.median(times[v]) / base for v in variants[1:]}
        result["shapes"][f"{b}x{t}"] = {"seconds": times, "ratios": ratios}
        print(f"prefill {b}x{t}: base {base * 1e3:.0f} ms; "
              + ", ".join(f"{v} {r:.3f}x" for v, r in ratios.items()), flush=True)
    if _patched(model):
        unpatch(model)
    out = Path(args.out) if args.out else RESULTS / (
        dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-fused-stats.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _patched(model: torch.nn.Module) -> bool:
    return any(isinstance(m, layer_mod.VPSLinear) for m in model.modules())


if __name__ == "__main__":
    raise SystemExit(main())
