"""``vps lm-eval``: lm-evaluation-harness's command line with ``--model vps`` / ``vps-base`` and the
offline ``gsm8k_local`` task available; every argument after ``lm-eval`` is lm-eval's own."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="lm-eval's arguments, e.g. --model vps --model_args "
                        "pretrained=smollm2-135m,vps_config=best.json --tasks gsm8k_local --limit 50 "
                        "(see docs/lm-eval.md)")
    # With no prefix characters this parser reads every word, -h and --model included, as a positional,
    # so REMAINDER hands all of them to lm-eval's parser (which has its own -h) untouched.
    p.prefix_chars = ""


def run(args: argparse.Namespace) -> int:
    # Imported here: `vps --help` and every other subcommand must not pay for (or need) lm-eval.
    from ..lmeval.cli import run_lm_eval

    if not args.lm_eval_args or args.lm_eval_args[0] in ("-h", "--help"):
        print("vps lm-eval: lm-eval's command line with --model vps / vps-base and the task gsm8k_local "
              "registered (docs/lm-eval.md); lm-eval's own help follows.\n", flush=True)
    return run_lm_eval(args.lm_eval_args)
