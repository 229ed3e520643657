"""The conformance suite (tests/ops/test_conformance.py) as a table: for each backend, op and input
dtype, the contract's tolerance (hnca_kernels.ops.contract) and how many of its cases pass.

    python benchmarks/conformance_table.py                 # every backend that runs here, the
                                                           # Triton kernels under TRITON_INTERPRET=1
    python benchmarks/conformance_table.py -m "not interpreter"

Runs pytest in this process and prints the Markdown table after its summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Collect:
    def __init__(self):
        self.cells = defaultdict(lambda: [0, 0, 0])  # (backend, op, dtype) -> [passed, failed, skipped]

    def pytest_runtest_logreport(self, report):
        if "test_backend_meets_the_contract[" not in report.nodeid or not (
                report.when == "call" or report.skipped or report.failed):  # a skip or an error in setup counts too
            return
        parts = report.nodeid.split("[", 1)[1].rstrip("]").split("-")
        backend, op, dtype = f"{parts[0]}-{parts[1]}", parts[2], parts[-1]
        cell = self.cells[backend, op, dtype]
        cell[0 if report.passed else 1 if report.failed else 2] += 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", default="interpreter or not interpreter", help="pytest marker expression")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from hnca_kernels.ops import contract

    collect = Collect()
    code = pytest.main([str(ROOT / "tests/ops/test_conformance.py"), "-q", "-m", args.m, "-p", "no:cacheprovider"],
                       plugins=[collect])
    dtypes = {"f64": torch.float64, "f32": torch.float32, "bf16": torch.bfloat16}
    try:
        import triton

        versions = f"torch {torch.__version__}, triton {triton.__version__} (TRITON_INTERPRET={os.environ['TRITON_INTERPRET']})"
    except ImportError:
        versions = f"torch {torch.__version__}, no triton"
    print(f"\nconformance ({versions}); tolerance: max |out - ref| <= rtol * max |ref| + atol, ref the float64 reference")
    print("| backend | op | inputs | rtol, atol | passed | failed | skipped |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (backend, op, dtype), (passed, failed, skipped) in sorted(collect.cells.items()):
        rtol, atol = contract.TOLERANCE[dtypes[dtype]]
        print(f"| {backend} | {op} | {dtype} | {rtol:g}, {atol:g} | {passed} | {failed} | {skipped} |")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
