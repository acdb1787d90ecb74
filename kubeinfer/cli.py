"""`kubeinfer serve | operator | render | bench | router | download`. Each subcommand lives beside what it runs."""
from __future__ import annotations

import argparse
import importlib
import sys

# module that defines `add_parser(subparsers)`; each registers its own subcommands
_SUBCOMMAND_MODULES = (
    "kubeinfer.engine.server.serve",
    "kubeinfer.operator.cli",
    "kubeinfer.bench",
    "kubeinfer.router.cli",
    "kubeinfer.download",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeinfer", description="LLM serving on Kubernetes")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
