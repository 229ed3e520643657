import os

import pytest
import torch

# Triton kernels run on CPU tensors under its interpreter; the flag must be set before triton
# (and hnca_kernels.ops.triton) is first imported, so it is set here, for every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
