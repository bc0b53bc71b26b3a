"""``vps refine``: iterative refinement of one answer with the verifier in the loop."""

from __future__ import annotations

import argparse
import sys

from .._io import dumps_strict
from ..prompting import chat_prompt
from ..refinement.config import MODES, SAMPLINGS, RefineConfig, RefineConfigError
from ..verify.composite import DEFAULT_WEIGHTS
from .common import (
    add_config_arguments,
    add_model_arguments,
    add_stop_argument,
    add_threads_argument,
    config_from_args,
    load,
    set_threads,
    stop_from_args,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", help="the question to answer (the chat template of the model wraps it)")
    add_model_arguments(p)
    p.add_argument("--gold", default=None, help="the gold answer (used by --mode oracle; else only reported)")
    p.add_argument("--mode", choices=MODES, default="self",
                   help="self: gold-free, the target is the samples' majority answer (default); oracle: the gold "
                        "answer is the target")
    p.add_argument("--iters", type=int, default=3,
                   help="decodes in all: iteration 0 is the plain greedy answer, each later one follows a "
                        "refinement step (default: %(default)s)")
    p.add_argument("--k-samples", type=int, default=4,
                   help="sampled answers drawn once, before the loop: their majority is the self-mode target "
                        "and they score self-consistency (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="token limit of every decode and every sample (default: %(default)s)")
    add_stop_argument(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the samples' randomness; the loop's decodes are greedy (default: %(default)s)")
    add_threads_argument(p)
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute the decoder blocks' activations in each refinement step's backward instead of "
                        "keeping them: less memory, one more forward of the blocks per step, the same numbers")
    p.add_argument("--sampling", choices=SAMPLINGS, default="streams",
                   help="how the samples draw their randomness (see vps.refinement); global reproduces older runs")
    p.add_argument("--json", action="store_true",
                   help="print the whole trace as JSON (strict: a loss without evidence is null, not NaN)")
    add_config_arguments(p)
    # The table's legend doubles as the help's epilog; the raw formatter keeps its one-column-per-line layout.
    p.epilog = LEGEND
    p.formatter_class = argparse.RawDescriptionHelpFormatter


REFINE_FLAGS = {"iters": "--iters", "k_samples": "--k-samples", "max_new_tokens": "--max-new-tokens",
                "mode": "--mode", "sampling": "--sampling", "seed": "--seed", "stop_strings": "--stop"}


def check_args(args: argparse.Namespace) -> RefineConfig:
    """Every flag checked before the model is loaded; the run's `RefineConfig` (its errors name the flag)."""
    if args.mode == "oracle" and args.gold is None:
        raise ValueError("--mode oracle needs --gold (the answer it is scored on)")
    if args.gold is not None:
        from ..verify import parse_gold

        try:
            parse_gold(args.gold)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--gold {args.gold!r}: not an answer ({exc})") from None
    if args.k_samples == 0:  # as vps eval refuses it for its refine methods
        raise ValueError("--k-samples 0 would skip self-consistency (no samples, no majority target); give at "
                         "least 1")
    try:
        return RefineConfig(iters=args.iters, mode=args.mode, k_samples=args.k_samples,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, sampling=args.sampling,
                            stop_strings=stop_from_args(args), checkpoint_activations=args.checkpoint_activations)
    except RefineConfigError as exc:
        flag = REFINE_FLAGS.get(exc.field)
        raise ValueError(f"{flag}: {exc}" if flag else str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ..patching import patch
    from ..refinement import refine
    from ..refinement.progress import phase_reports

    config = check_args(args)
    cfg = config_from_args(args)  # a bad VPS flag fails before loading
    set_threads(args)
    model, tok = load(args)
    patch(model, cfg)
    prompt = chat_prompt(tok, args.question)
    # On a CPU a step of a larger model takes minutes: say on stderr which phase the loop is in.
    with phase_reports(lambda phase: print(f"[{phase}]", file=sys.stderr, flush=True)):
        result = refine(model, tok, prompt, gold=args.gold, config=config)
    if args.json:
        # Strict JSON: a number that is not finite is null - e.g. a loss "total" with no evidence.
        print(dumps_strict(result.to_dict(), indent=2))
        return 0
    print(target_line(result.oracle, result.reference, result.samples))
    print(format_table(result.trace))
    print(LEGEND)
    print(f"best: iteration {result.best_index}, answer {result.best_answer.text if result.best_answer else None}"
          f"{'  [ORACLE]' if result.oracle else ''}  ({result.tokens} tokens, {result.seconds:.1f} s)")
    if args.gold is not None and not result.oracle:
        print(f"gold (not used by the loop): {args.gold}")
    return 0


_W = DEFAULT_WEIGHTS
LEGEND = f"""\
columns: one row per iteration; it 0 is the plain greedy answer, each later row follows one refinement step.
  total    verifier loss, 0 best to 1 worst: the weighted mean of the components below that have evidence
           (weights numeric {_W['numeric']:g}, units {_W['units']:g}, self_c {_W['self_consistency']:g}, \
alg {_W['algebraic']:g}); "best" is the row with the lowest total
  numeric  graded error of the answer's number against the target answer (0 = equal)
  units    disagreement of the answer's units with the target answer's
  self_c   self-consistency: 1 - (samples agreeing with the answer) / k
  alg      symbolic (sympy) non-equivalence with the target answer
  sigma    policy strength, mean over the patched layers (0 = no perturbation, 1 = full)
  gamma    perturbation scale the policy chose, mean over the patched layers
  rank     perturbation rank the policy chose, mean over the patched layers
  sc       patched layers whose selectors the SC builder made (under --builder hybrid only where a
           gradient was captured, so 0 at it 0)
  gain-1   mean per-layer gain minus 1: how far the L-BFGS-preconditioned steps have moved the gains
  H        entropy (nats) of the first generated token's distribution; the policy sees it next iteration
  sec      wall time of the iteration
  answer   the answer read from the iteration's text, in full
  -        no evidence for that component (no target answer, fewer than 2 samples, nothing symbolic, ...)"""


def target_line(oracle: bool, reference: str | None, samples: list[str | None]) -> str:
    """The run's first line: the mode and the answer the loop aims at, said so that the samples' majority
    (self mode) is not mistaken for the gold answer."""
    if oracle:
        return (f"mode: ORACLE (uses the gold answer it is scored on); target answer: {reference} (the gold); "
                f"samples: {samples}")
    if reference is None:
        target = ("none: no two samples agree, so numeric, units and alg have no evidence and the refinement "
                  "steps fit the prompt's own tokens")
    else:
        target = f"{reference} (the samples' majority answer, not the gold)"
    return f"mode: self (gold-free); target answer: {target}; samples: {samples}"


def format_table(trace: list[dict]) -> str:
    """One line per iteration: loss components, policy summary, timing, then the answer in full (last, so
    that no answer is cut). `LEGEND` explains the columns."""
    head = (f"{'it':>2} {'total':>6} {'numeric':>7} {'units':>5} {'self_c':>6} {'alg':>5} "
            f"{'sigma':>6} {'gamma':>6} {'rank':>5} {'sc':>4} {'gain-1':>8} {'H':>5} {'sec':>6}  answer")
    lines = [head, "-" * len(head)]

    def f(v: float | None, w: int, p: int = 3) -> str:
        return f"{'-':>{w}}" if v is None or v != v else f"{v:>{w}.{p}f}"

    for row in trace:
        c = row["loss"]["components"]
        pol = row["policy"]
        answer = "-" if row["answer"] is None else " ".join(str(row["answer"]).split())  # one line, whole
        lines.append(
            f"{row['iter']:>2} {f(row['loss']['total'], 6)} {f(c.get('numeric'), 7)} "
            f"{f(c.get('units'), 5, 2)} {f(c.get('self_consistency'), 6)} {f(c.get('algebraic'), 5, 2)} "
            f"{f(pol.get('sigma'), 6)} {f(pol.get('gamma'), 6)} {f(pol.get('rank'), 5, 2)} "
            f"{pol.get('builders', {}).get('sc', 0):>4} {row['mean_gain'] - 1:>8.1e} {f(row['entropy'], 5, 2)} "
            f"{f(row['seconds'], 6, 1)}  {answer}")
    return "\n".join(lines)
