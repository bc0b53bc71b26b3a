#!/usr/bin/env python
"""What a patched layer adds to a frozen decode step: dispatched ops and wall time (issue #34, item 1).

A frozen decode step reuses the plan built at prefill. Applied unfolded (gather the base output at
``out_idx``, subtract the bias there, mix by the SC coefficients, then ``baddbmm`` with Q) it costs
up to five ops per layer; applied folded (``out += (x @ A) @ Q`` with ``A = W^T V`` kept since the
plan was built) it costs two. Both forms run in this one process: ``VPSLinear.folded_decode = False``
selects the unfolded reference.

Ops: every op dispatched during one KV-cached decode step (after a prefill and one uncounted step)
is counted under a ``TorchDispatchMode``, as tests/core/test_op_budget.py counts them; the figure is
(patched - unpatched) / patched layers, split into compute ops and views, per architecture (Llama:
no biases; Qwen2: q/k/v biases) and builder (SK one-hot; SC mixed outputs).

Time: a random-weight tiny Llama built from a config (no download), one thread. Each round prefills
the same prompt (untimed) for the unpatched model and for each form, then runs ``--steps`` decode
steps fed fixed tokens, step i of every mode back to back (order rotating), each step timed alone.
The figure is the median step time over all rounds, patched minus unpatched, divided by the patched
layers, in microseconds; the 10th percentile is given the same way, since on a loaded machine the
step times have a long upper tail and the low quantiles move far less between runs. Both come twice:
wall time (what a user waits) and the thread's CPU time (``time.thread_time``), which leaves out the
time the thread spent descheduled.

    OMP_NUM_THREADS=1 python benchmarks/decode_ops.py            # prints, appends to results/decode_ops.jsonl
    OMP_NUM_THREADS=1 python benchmarks/decode_ops.py --rounds 3 --steps 50 --no-save   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import vps
from vps.kv_cache import cache_argument, output_cache

RESULTS = Path(__file__).resolve().parent / "results"
# The tests' tiny shapes (tests/helpers/tiny.py): small enough that a decode step is mostly per-op overhead,
# which is what the fold removes.
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
PROMPT = 16


class _Count(TorchDispatchMode):
    """Counts dispatched ops, views apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops["view" if func.is_view else "compute"] += 1
        return func(*args, **(kwargs or {}))


def tiny_model(arch: str, layers: int) -> torch.nn.Module:
    """A random-weight model of the tests' tiny shape (biases drawn non-zero for Qwen2, so they matter)."""
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**dict(TINY, num_hidden_layers=layers))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def set_folded(model: torch.nn.Module, folded: bool) -> None:
    """Apply reused plans folded (True) or by the unfolded reference path (False)."""
    for layer in vps.vps_layers(model).values():
        layer.folded_decode = folded


def count_decode_step(model: torch.nn.Module, batch: int) -> collections.Counter[str]:
    """Ops of one KV-cached decode step, after a prefill and one uncounted step."""
    kw = cache_argument(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, TINY["vocab_size"], (batch, PROMPT), generator=gen)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = output_cache(out)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{kw: cache})
        mode = _Count()
        with mode:
            model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{kw: cache})
    return mode.ops


def op_rows(batch: int, layers: int) -> list[dict[str, Any]]:
    """Ops per patched layer of a frozen decode step, unfolded vs folded, per architecture and builder."""
    rows = []
    for arch in ARCHS:
        for builder in ("sk", "sc"):
            model = tiny_model(arch, layers)
            base = count_decode_step(model, batch)
            vps.patch(model, vps.VPSConfig(builder=builder, topk=8))
            n = len(vps.vps_layers(model))
            row: dict[str, Any] = {"arch": arch, "builder": builder, "patched_layers": n}
            for name, folded in (("unfolded", False), ("folded", True)):
                set_folded(model, folded)
                ops = count_decode_step(model, batch)
                row[name] = {kind: (ops[kind] - base[kind]) / n for kind in ("compute", "view")}
            rows.append(row)
    return rows


def _prefill(model: torch.nn.Module, prompt: torch.Tensor) -> Any:
    with torch.no_grad():
        return output_cache(model(input_ids=prompt, use_cache=True))


def _one_round(modes: dict[str, tuple[torch.nn.Module, bool | None]], prompt: torch.Tensor, feed: torch.Tensor,
               first: int) -> dict[str, dict[str, list[float]]]:
    """Wall and thread-CPU seconds of every mode's decode steps, the modes interleaved step by step.

    Each mode decodes from its own cache (both patched forms hold the same plan: the same prompt
    was prefilled), and step i of every mode runs back to back, in an order that rotates with i, so
    a burst of load on the machine hits all modes of a step alike and cancels in their difference.
    """
    names = list(modes)
    caches = {m: _prefill(modes[m][0], prompt) for m in names}
    kw = cache_argument(modes[names[0]][0])
    out: dict[str, dict[str, list[float]]] = {clock: {m: [] for m in names} for clock in ("wall", "cpu")}
    with torch.no_grad():
        for i in range(feed.shape[1]):
            token = feed[:, i:i + 1]
            k = (first + i) % len(names)
            for m in names[k:] + names[:k]:
                model, folded = modes[m]
                if folded is not None:
                    set_folded(model, folded)
                start, start_cpu = time.perf_counter(), time.thread_time()
                model(input_ids=token, use_cache=True, **{kw: caches[m]})
                out["cpu"][m].append(time.thread_time() - start_cpu)
                out["wall"][m].append(time.perf_counter() - start)
    return out


def timing(batch: int, layers: int, steps: int, rounds: int) -> dict[str, Any]:
    """Median (and 10th percentile) decode step time of the unpatched model and of both forms, and the
    extra microseconds per patched layer: (patched - unpatched) / patched layers."""
    base = tiny_model("llama", layers)
    patched = vps.patch(tiny_model("llama", layers), vps.VPSConfig(builder="sk"))
    n = len(vps.vps_layers(patched))
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, TINY["vocab_size"], (batch, PROMPT), generator=gen)
    feed = torch.randint(3, TINY["vocab_size"], (batch, steps), generator=gen)
    modes: dict[str, tuple[torch.nn.Module, bool | None]] = {
        "base": (base, None), "unfolded": (patched, False), "folded": (patched, True)}
    _one_round(modes, prompt, feed[:, :8], 0)  # warm-up: allocator, caches, lazy imports
    samples: dict[str, dict[str, list[float]]] = {clock: {m: [] for m in modes} for clock in ("wall", "cpu")}
    for r in range(rounds):
        got = _one_round(modes, prompt, feed, r)
        for clock, by_mode in got.items():
            for m, values in by_mode.items():
                samples[clock][m].extend(values)
    out: dict[str, Any] = {"model": "tiny llama (tests/tiny.py shape)", "builder": "sk", "batch": batch,
                           "prompt": PROMPT, "steps": steps, "rounds": rounds, "patched_layers": n}
    for clock, by_mode in samples.items():
        row: dict[str, Any] = {}
        for stat, pick in (("median", statistics.median), ("p10", _p10)):
            step_us = {m: 1e6 * pick(v) for m, v in by_mode.items()}
            row[f"{stat}_step_us"] = step_us
            row[f"{stat}_extra_us_per_layer"] = {m: (step_us[m] - step_us["base"]) / n for m in ("unfolded", "folded")}
        out[clock] = row
    return out


def _p10(values: list[float]) -> float:
    """The 10th percentile: on a loaded machine the step times have a long upper tail of interruptions,
    and the low quantiles move far less between runs than the median."""
    return statistics.quantiles(values, n=10)[0]


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="sequences per decode step (default 1)")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks of the tiny model (default 2)")
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per round (default 100)")
    p.add_argument("--rounds", type=int, default=21, help="rounds per mode (default 21)")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to results/decode_ops.jsonl")
    args = p.parse_args(argv)
    if min(args.batch, args.layers, args.steps, args.rounds) < 1:
        raise SystemExit("--batch, --layers, --steps and --rounds must be at least 1")
    torch.set_num_threads(1)
    ops = op_rows(args.batch, args.layers)
    times = timing(args.batch, args.layers, args.steps, args.rounds)
    print(f"frozen decode step, batch {args.batch}: ops per patched layer beyond the base linear (compute / view)")
    for row in ops:
        u, f = row["unfolded"], row["folded"]
        print(f"  {row['arch']:6s} {row['builder']:3s}  unfolded {u['compute']:4.2f} / {u['view']:4.2f}   "
              f"folded {f['compute']:4.2f} / {f['view']:4.2f}")
    print(f"tiny llama, sk, {times['patched_layers']} patched layers, one thread, median of "
          f"{args.rounds} x {args.steps} steps")
    for clock in ("wall", "cpu"):
        for stat in ("median", "p10"):
            step, extra = times[clock][f"{stat}_step_us"], times[clock][f"{stat}_extra_us_per_layer"]
            print(f"  {clock:4s} {stat:6s} base     {step['base']:8.1f} us/step")
            for m in ("unfolded", "folded"):
                print(f"  {clock:4s} {stat:6s} {m:8s} {step[m]:8.1f} us/step  "
                      f"extra {extra[m]:6.2f} us per patched layer")
    row = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_avg": list(os.getloadavg()),
           "ops_per_patched_layer": ops, "timing": times}
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / "decode_ops.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
