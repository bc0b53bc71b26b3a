"""The ``vps`` command line: a thin dispatcher over one small module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# subcommand -> module under vps.commands (dashes as underscores) holding add_arguments(parser) and run(args) -> int
COMMANDS = {
    "generate": "Answer a question with the model, with VPS on, off, or both side by side.",
    "refine": "Refine one answer over several iterations with the verifier in the loop.",
    "info": "Versions, the model cache location and the cached models.",
    "eval": "Evaluate base / vps / refine methods on a dataset: resumable JSONL rows, report.md and report.png.",
    "rescore": "Read a finished run's answers again in another extraction mode (no generation): rows and report.",
    "ablate": "Run a grid of VPS configurations (default: the seed's) against the baseline, model loaded once.",
    "tune": "Search VPS configurations (Optuna) for the one that lowers gold-solution NLL on a train split; resumable.",
    "bench": "VPS overhead vs the unpatched model: prefill, greedy decode and peak memory ratios.",
    "lm-eval": "lm-evaluation-harness with --model vps / vps-base and the offline task gsm8k_local registered.",
}
# Subcommands that shard their items over the processes of a launch (vps.evaluation.distributed).
SHARDED = ("eval", "ablate")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="vps", description="Virtual Parameter Sharpening for causal LMs.")
    parser.add_argument("--version", action="version", version=f"vps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"vps.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vps`` console script."""
    args = build_parser().parse_args(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    if args.command in SHARDED:
        _warn_lone_launch(args.command)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vps {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous


def _warn_lone_launch(command: str) -> None:
    """Say so (stderr, one line) when a launcher asked for several processes and started only this one."""
    from .evaluation.distributed import lone_launch_warning

    if line := lone_launch_warning(command):
        print(f"vps {command}: warning: {line}", file=sys.stderr)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    # A user of the command line needs the message, not the Python source line that raised it.
    return f"warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
