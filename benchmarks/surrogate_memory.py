#!/usr/bin/env python
"""Memory of refinement's surrogate step (one teacher-forced forward and backward to the gains), five ways.

The step back-propagates through every patched layer over the whole prompt, so its memory grows with
prompt length x batch; on Qwen2.5-Coder-1.5B with the 5-shot GSM8K prompt it decided how large a batch
`vps eval --methods refine-self` could run (issue #30). Two savings change nothing the step computes:

- ``lean gather``: the plan's gather of selected output features saves only its index for the backward
  pass, not the layer's whole base output (`vps.lean_gather`);
- ``kept logits``: logits are formed only from the earliest scored position on (``logits_to_keep``);
- ``checkpointed blocks``: both, and the decoder blocks keep only their inputs for the backward, which
  recomputes the rest (``RefineConfig.checkpoint_activations``, `vps.refinement.checkpointing`): one more
  forward of the blocks.

Each variant runs in its own process (peak RSS is per process) on the same first GSM8K test questions with
the answer target ``#### <gold>``, and reports the RSS before the step (model loaded), the step's peak RSS
(VmHWM reset after loading, as `vps bench`'s memory probe does, `vps.bench.memory`), the bytes autograd saved
for the backward pass (GiB), and a digest of the losses and the gains' gradient, which must agree across
variants. Unlike the probe, it leaves glibc's allocator as it is unless ``--mmap-threshold`` is given, since
what a refinement run meets by default is the point.

    python benchmarks/surrogate_memory.py --model smollm2-135m --dtype float32 --batch 4 --threads 1 \\
        --out benchmarks/results/surrogate-memory-smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (lean gather, kept logits, checkpointed blocks)
    "before": (False, False, False),
    "lean gather": (True, False, False),
    "kept logits": (False, True, False),
    "both (the library's step)": (True, True, False),
    "checkpointed blocks": (True, True, True),
}


def _gib(mib: float | None) -> float | None:
    return None if mib is None else mib / 1024


def _measure(args: argparse.Namespace, lean: bool, keep: bool, checkpoint: bool) -> dict:
    """One variant, in this process."""
    import torch

    import vps
    from vps import layer as layer_module
    from vps.bench.memory import _current_rss_mb, _peak_rss_mb, _reset_peak_rss
    from vps.evaluation.data import load_items, read_gold
    from vps.models import load_model
    from vps.prompting import PromptSettings
    from vps.refinement import loop
    from vps.refinement.gains import GainOptimizer

    torch.set_num_threads(args.threads)
    if not lean:
        layer_module.gather_features = lambda s, i: torch.gather(s, 2, i)  # type: ignore[attr-defined]
    if not keep:
        loop._keeps_logits = lambda model: False  # type: ignore[assignment]
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    vps.patch(model, vps.VPSConfig())
    fmt = PromptSettings("fewshot", args.shots).format()
    items = load_items("gsm8k:test", limit=args.batch).items
    prompts = [fmt.render(tok, it.question) for it in items]
    targets = [loop._target_ids(tok, p, read_gold(it.answer)) for p, it in zip(prompts, items, strict=True)]
    gains = GainOptimizer(model, batch=len(prompts))
    recorded = {}
    step = gains.step

    def recording_step():
        recorded["grad"] = gains.gradient().clone()
        return step()

    gains.step = recording_step  # type: ignore[method-assign]
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # As `vps bench`'s memory probe measures: the peak RSS (VmHWM) is reset once the model is loaded, so the
    # peak read after the step is the step's own (weights and runtime included), loading left out.
    gc.collect()
    reset = _reset_peak_rss()
    before = _current_rss_mb()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        infos = loop._surrogate_step(model, tok, prompts, targets, gains, torch.device("cpu"), checkpoint)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    losses = [info["loss"] for info in infos]
    digest = hashlib.sha256(json.dumps(losses).encode() + recorded["grad"].numpy().tobytes()).hexdigest()[:16]
    tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    return {
        "rss_before_step_gib": _gib(before),
        "step_peak_gib": _gib(peak),
        "peak_reset": reset,  # False: no /proc/self/clear_refs, and the peak includes loading
        "saved_activation_gib": sum(v for k, v in saved.items() if k not in params) / 2**30,
        "seconds": seconds,
        "prompt_tokens": tokens,
        "losses": losses,
        "digest": digest,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4, help="prompts in the step (default: 4)")
    p.add_argument("--shots", type=int, default=5, help="solved examples in the fewshot prompt (default: 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="run each variant with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: allocations from that size "
                        "on are mapped and returned to the system when freed (default: glibc's own, which "
                        "rises to 32 MiB as large blocks are freed)")
    p.add_argument("--variants", default=",".join(VARIANTS), metavar="NAMES",
                   help="comma-separated variants to run (default: all: " + ", ".join(VARIANTS) + ")")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--variant", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.mmap_threshold is not None and args.mmap_threshold < 0:
        p.error(f"--mmap-threshold must be >= 0, got {args.mmap_threshold}")
    chosen = [name.strip() for name in args.variants.split(",")]
    if unknown := [name for name in chosen if name not in VARIANTS]:
        p.error(f"--variants: unknown {unknown}; choose among {list(VARIANTS)}")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out: folder {args.out.parent} does not exist")
    if args.variant is not None:  # a child: one variant, its result as JSON on stdout
        print(json.dumps(_measure(args, *VARIANTS[args.variant])))
        return 0
    runs = {}
    for name in chosen:
        cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--batch", str(args.batch),
               "--shots", str(args.shots), "--threads", str(args.threads), "--variant", name]
        env = dict(os.environ)
        if args.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        r = runs[name]
        print(f"{name:28s} step's peak RSS {r['step_peak_gib']:6.2f} GiB "
              f"(model loaded: {r['rss_before_step_gib']:5.2f} GiB), "
              f"saved for backward {r['saved_activation_gib']:6.2f} GiB, {r['seconds']:6.1f} s, digest {r['digest']}",
              flush=True)
    digests = {r["digest"] for r in runs.values()}
    result = {
        # quoted, so a variant name with spaces reads back as one argument
        "command": shlex.join(["python", "benchmarks/surrogate_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "shots": args.shots, "threads": args.threads,
        "mmap_threshold": args.mmap_threshold,
        "identical_losses_and_gradients": len(digests) == 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }
    print("losses and gains' gradient identical across variants:", result["identical_losses_and_gradients"])
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
