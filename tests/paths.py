"""Where the tests find the repository and MNIST: ``HNCA_DATA_DIR`` (as the loader reads it), else
the project's shared data folder beside the repository (``../shared/data/mnist``); a test that needs
the data skips without it (``requires_mnist``)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HNCA_DATA_DIR") or ROOT.parent / "shared" / "data" / "mnist")
HAVE_MNIST = (SHARED / "train-images-idx3-ubyte.gz").exists() or (SHARED / "train-images-idx3-ubyte").exists()
requires_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST not found in {SHARED} (set HNCA_DATA_DIR)")
