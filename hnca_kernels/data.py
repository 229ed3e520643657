"""MNIST without torchvision: IDX files (gzipped or not), checked, and dynamic binarization.

The files are looked for in ``root``, else ``$HNCA_DATA_DIR``, else a cache directory
(``$XDG_CACHE_HOME/hnca_kernels/mnist``) where they are downloaded if missing. Every file's
MD5 (of the uncompressed bytes) is checked, so a corrupt or truncated file is an error.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

# name -> md5 of the uncompressed file
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
           "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8}


class MNISTError(RuntimeError):
    """The MNIST files could not be found, downloaded or read."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hnca_kernels" / "mnist"


def _read_file(directory: Path, name: str) -> bytes | None:
    for candidate, opener in ((directory / name, open), (directory / f"{name}.gz", gzip.open)):
        if candidate.exists():
            try:
                with opener(candidate, "rb") as f:
                    return f.read()
            except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
                raise MNISTError(f"cannot read {candidate}: {exc}") from exc
    return None


def _download(directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, tempfile.NamedTemporaryFile(
                dir=directory, delete=False
            ) as tmp:
                shutil.copyfileobj(response, tmp)
            data = gzip.decompress(Path(tmp.name).read_bytes())
            if hashlib.md5(data).hexdigest() != MNIST_FILES[name]:
                raise MNISTError(f"checksum mismatch for {url}")
            os.replace(tmp.name, directory / f"{name}.gz")
            return
        except Exception as exc:  # try the next mirror
            errors.append(f"{url}: {exc}")
            if "tmp" in locals() and os.path.exists(tmp.name):
                os.unlink(tmp.name)
    raise MNISTError(f"could not download {name} ({'; '.join(errors)})")


def _parse_idx(data: bytes, name: str) -> np.ndarray:
    if len(data) < 4:
        raise MNISTError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise MNISTError(f"{name}: not an unsigned-byte IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise MNISTError(f"{name}: expected {int(np.prod(shape))} data bytes for shape {shape}, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _locate(root) -> tuple[Path, bool]:
    if root is not None:
        return Path(root), False
    if os.environ.get("HNCA_DATA_DIR"):
        return Path(os.environ["HNCA_DATA_DIR"]), False
    return default_cache_dir(), True


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = True):
    """Images [N, 784] as float32 intensities in [0, 1] and labels [N] int64.

    ``root`` (or ``$HNCA_DATA_DIR``) must hold the files; only the default cache directory is
    downloaded into (when ``download``).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory, may_download = _locate(root)
    arrays = []
    for name in _SPLITS[split]:
        data = _read_file(directory, name)
        if data is None and may_download and download:
            _download(directory, name)
            data = _read_file(directory, name)
        if data is None:
            hint = "pass a directory, set HNCA_DATA_DIR, or allow the download" if not may_download else "download disabled"
            raise MNISTError(f"{name}[.gz] not found in {directory} ({hint})")
        if hashlib.md5(data).hexdigest() != MNIST_FILES[name]:
            raise MNISTError(f"{directory / name}: checksum mismatch (corrupt or truncated file); delete it and retry")
        arrays.append(_parse_idx(data, name))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise MNISTError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


def binarize(intensities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarization: each pixel is 1 with probability equal to its intensity, drawn afresh.

    The uniforms are drawn on ``generator``'s device (so a CPU generator serves CUDA data and
    the draws do not depend on where the data lives) and compared on the data's device.

    >>> x = binarize(images, generator=torch.Generator().manual_seed(0))  # [N, 784] of 0.0 / 1.0
    """
    if not isinstance(intensities, torch.Tensor) or not intensities.is_floating_point():
        raise TypeError(f"intensities must be a floating tensor, got {getattr(intensities, 'dtype', type(intensities))}")
    if intensities.numel() and not ((intensities >= 0) & (intensities <= 1)).all():
        raise ValueError("intensities must lie in [0, 1] (pixel values divided by 255)")
    device = generator.device if generator is not None else intensities.device
    uniform = torch.rand(intensities.shape, generator=generator, device=device).to(intensities.device)
    return (uniform < intensities).to(intensities.dtype)
