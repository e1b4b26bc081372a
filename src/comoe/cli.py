"""The `comoe` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comoe", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train SmolLM2-135M with CoMoE experts briefly, save, reload, generate"
    )
    demo.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=40, help="training steps (default: 40)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from comoe.demo import run_demo

            run_demo(output=args.output, steps=args.steps)
    except (ValueError, FileNotFoundError, ImportError) as error:
        if args.debug:
            raise
        print(f"comoe: error: {error} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
