"""The ``hnca`` command: ``hnca bandit``, ``hnca vae``, ``hnca plot``, ``hnca sample``.

Every expected error is one line on stderr, ``hnca <command>: <message>``, and exit status 1
(files, data, training) or 2 (a command line that cannot be used, as argparse); Ctrl-C exits with
status 130. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .experiments.rundir import CommandError

# Each module defines register(subparsers), which adds its subcommands with a handler in ``func``.
_COMMAND_MODULES = (
    "hnca_kernels.experiments.vae",
    "hnca_kernels.experiments.bandit",
    "hnca_kernels.experiments.plot",
)


class _UsageError(CommandError):
    def __init__(self, prog: str, message: str):
        super().__init__(message, status=2)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``hnca vae: error: ...``) instead of usage + error."""

    def error(self, message: str):
        raise _UsageError(self.prog, f"error: {message} (see {self.prog} -h)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hnca", description="Train networks of discrete stochastic units with HNCA.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Run ``hnca`` with ``argv``; returns the exit status (errors already printed on stderr)."""
    prog = "hnca"

    def warning_line(message, category, filename, lineno, line=None):  # a warning is one line, like an error
        return f"{prog}: warning: {_one_line(str(message))}\n"

    previous, warnings.formatwarning = warnings.formatwarning, warning_line
    try:
        args = build_parser().parse_args(argv)
        prog = f"hnca {args.command}"
        return args.func(args) or 0
    except CommandError as exc:
        prefix = getattr(exc, "prog", prog)
        message = str(exc) if exc.status != 2 or str(exc).startswith("error: ") else f"error: {exc}"
        print(f"{prefix}: {_one_line(message)}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    raise SystemExit(main())
