"""The ``hnca`` command: ``hnca bandit``, ``hnca vae``, ``hnca plot``, ``hnca sample``."""

from __future__ import annotations

import argparse
import importlib

# Each module defines register(subparsers), which adds its subcommands with a handler in ``func``.
_COMMAND_MODULES = (
    "hnca_kernels.experiments.vae",
    "hnca_kernels.experiments.bandit",
    "hnca_kernels.experiments.plot",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnca", description="Train networks of discrete stochastic units with HNCA.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
