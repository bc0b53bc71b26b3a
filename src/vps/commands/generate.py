"""``vps generate``: answer one question, streaming tokens; with ``--compare`` VPS off and on."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..compiling import COMPILE_MODES, check_mode
from ..prompting import CHAT_STYLES, PromptFormat
from .common import (
    add_config_arguments,
    add_model_arguments,
    add_stop_argument,
    add_threads_argument,
    config_flags_given,
    config_from_args,
    load,
    set_threads,
    stop_from_args,
)

if TYPE_CHECKING:
    from ..config import VPSConfig

# What a user waits for at the first compiled generate(), as measured (compile time grows with the depth).
COMPILE_SCALE = ("expect minutes: the bundled 30-block SmolLM2-135M took about 8 min on 2 CPU cores (issue #31), a "
                 "28-block 7B did not finish in 170 s on a GPU host (issue #34)")


@contextlib.contextmanager
def _compile_clock(active: bool) -> Iterator[Any]:
    """A `vps.compiling.CompileClock` while ``active``, else None (an uncompiled run imports no dynamo)."""
    if not active:
        yield None
        return
    from ..compiling import CompileClock

    with CompileClock() as clock:
        yield clock


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question")
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add_stop_argument(p)
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")
    add_threads_argument(p)
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the (patched) forward, fullgraph (MODE: "
                        f"{', '.join(COMPILE_MODES)}; default mode when given bare); decodes into a static KV "
                        "cache (one prefill and one decode graph); the first call compiles, and the compile time "
                        "is reported on its own line, apart from tokens/s")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--vps", dest="mode", action="store_const", const="vps", help="generate with VPS (default)")
    mode.add_argument("--no-vps", dest="mode", action="store_const", const="base", help="the unpatched model")
    mode.add_argument("--compare", dest="mode", action="store_const", const="compare",
                      help="the same question without and with VPS, one after the other")
    p.set_defaults(mode="vps")
    p.add_argument("--prompt", default="tutor", choices=CHAT_STYLES,
                   help="tutor: step by step, '#### <answer>'; boxed: the Qwen family's '\\boxed{}' convention "
                        "(default: %(default)s)")
    p.add_argument("--system", default=None, help="system prompt (default: the --prompt style's own)")
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from ..patching import disabled, patch
    from ..prompting import generate_texts
    from ..tracing import format_summary
    from ..verify import extract_answer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be a number >= 0, got {args.temperature}")
    stops = stop_from_args(args)
    cfg: VPSConfig | None = config_from_args(args)  # a bad VPS flag fails before loading, whatever the mode
    if args.mode == "base":
        if given := config_flags_given(args):
            raise ValueError(f"--no-vps generates with the unpatched model, so {', '.join(given)} would do nothing; "
                             f"drop it, or use --compare to see both")
        cfg = None
    if args.compile is not None:
        check_mode(args.compile)
    set_threads(args)
    model, tok = load(args)
    print(f"[model loaded in {getattr(model, 'vps_load_seconds', float('nan')):.2f} s]", file=sys.stderr)
    prompt = PromptFormat(args.prompt, args.system).render(tok, args.question)
    from ..evaluation.checks import model_context

    context, n_prompt = model_context(model), len(tok(prompt, add_special_tokens=False)["input_ids"])
    if context is not None and n_prompt + args.max_new_tokens > context:
        # Refused rather than run: a prompt past the context runs for minutes in one uninterruptible prefill.
        raise ValueError(f"the prompt is {n_prompt:,} tokens and --max-new-tokens {args.max_new_tokens:,} adds more, "
                         f"beyond the model's context of {context:,} tokens; shorten the question or lower "
                         f"--max-new-tokens")
    if cfg is not None:
        patch(model, cfg)
    if args.compile is not None:
        from ..compiling import compile_forward

        compile_forward(model, args.compile)  # after patching: the compiled graph holds the VPS layers
        # A static cache keeps every decode step's shapes fixed: one prefill graph and one decode graph
        # for the whole answer, where a growing dynamic cache costs a recompilation for dynamic shapes.
        model.generation_config.cache_implementation = "static"
        depth = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        print(f"[compiling... torch.compile(mode {args.compile}, fullgraph) of the forward"
              f"{f' ({depth} blocks)' if depth else ''} happens in the first generate(): {COMPILE_SCALE}; "
              "compile time is reported apart from tokens/s]", file=sys.stderr, flush=True)
    runs = {"base": ["base"], "vps": ["vps"], "compare": ["base", "vps"]}[args.mode]
    for label in runs:
        print(f"--- {'VPS off' if label == 'base' else 'VPS on'} ---", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        with _compile_clock(args.compile is not None) as clock:
            start = time.perf_counter()
            if label == "base" and args.mode == "compare":
                with disabled(model):
                    texts, n = generate_texts(model, tok, [prompt], args.max_new_tokens, args.temperature,
                                              args.seed, streamer, stop_strings=stops)
            else:
                texts, n = generate_texts(model, tok, [prompt], args.max_new_tokens, args.temperature, args.seed,
                                          streamer, stop_strings=stops)
            took = time.perf_counter() - start
        compiled = clock.seconds if clock is not None else 0.0
        if clock is not None:
            print(f"[compile time: {compiled:.1f} s ({clock.compilations} compilation(s)) in this generate(), "
                  "not counted in tok/s]", file=sys.stderr)
        answer = extract_answer(texts[0])
        cut = " - stopped at --max-new-tokens, the answer may be cut off" if n[0] >= args.max_new_tokens else ""
        print(f"[answer: {answer.text if answer is not None else 'none found'}; {n[0]} tokens in "
              f"{took - compiled:.1f} s, {n[0] / max(took - compiled, 1e-9):.1f} tok/s{cut}]", file=sys.stderr)
        if label == "vps":
            print(f"[{format_summary(model)}]", file=sys.stderr)
    return 0
