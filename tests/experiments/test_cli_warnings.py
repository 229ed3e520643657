"""The command line's warnings: one line on stderr, like its errors (fast: no data, no training)."""

import argparse
import sys
import warnings

from hnca_kernels import cli


class _Parser:
    def __init__(self, func):
        self.func = func

    def parse_args(self, argv):
        return argparse.Namespace(command="vae", func=self.func)


def test_a_warning_is_one_line_on_stderr(monkeypatch, capsys):
    def command(args):
        warnings.warn("the kernels failed to build\nsecond line of the log")
        return 0

    monkeypatch.setattr(cli, "build_parser", lambda: _Parser(command))
    before = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # as outside pytest (which records warnings): printed through warnings.formatwarning
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        assert cli.main([]) == 0
    assert capsys.readouterr().err == "hnca vae: warning: the kernels failed to build; second line of the log\n"
    assert warnings.formatwarning is before
