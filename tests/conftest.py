import os

import pytest
import torch

# Triton kernels run on CPU tensors under its interpreter; the flag must be set before triton
# (and hnca_kernels.ops.triton) is first imported, so it is set here, for every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU the Triton kernels run at one fixed tile in the tests: autotuning each test's shape
    # would compile and time every candidate tile (minutes); benchmarks/gpu_kernels.py covers it.
    os.environ.setdefault("HNCA_TRITON_TILE", "64,128,4,0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
