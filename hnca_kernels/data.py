"""The data sets of the experiments, and dynamic binarization.

``mnist`` needs no torchvision: IDX files (gzipped or not) looked for in ``root``, else
``$HNCA_DATA_DIR``, else a cache directory (``$XDG_CACHE_HOME/hnca_kernels/mnist``) where they are
downloaded if missing. Every file's MD5 (of the uncompressed bytes) is checked, so a corrupt or
truncated file is an error.

``fashion-mnist``, ``kmnist``, ``emnist-letters`` and ``mnist-torchvision`` (the same MNIST read by
torchvision, to check one path against the other) come through ``torchvision.datasets`` (the
``vision`` extra) from a torchvision root: ``root``, else ``$HNCA_DATA_DIR``, else
``$XDG_CACHE_HOME/hnca_kernels/torchvision``; as for ``mnist``, only the cache is downloaded into.
Every data set gives the same tensors: intensities [N, 784] float32 in [0, 1] and labels [N] int64
in 0..C-1.
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


class DatasetError(RuntimeError):
    """A data set could not be found, downloaded or read (the message is one line)."""


class MNISTError(DatasetError):
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
    raise MNISTError(f"could not download {name} ({'; '.join(errors)}); offline, put the four IDX files in a "
                     "directory and pass it (--data-dir, or HNCA_DATA_DIR)")


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


def _locate(root) -> tuple[Path, bool, str]:
    """(the directory, whether it may be downloaded into, where its name came from)."""
    if root is not None:
        return Path(root), False, "the directory given"
    if os.environ.get("HNCA_DATA_DIR"):
        return Path(os.environ["HNCA_DATA_DIR"]), False, "HNCA_DATA_DIR"
    return default_cache_dir(), True, "the default cache"


def load_mnist(split: str = "train", root: str | os.PathLike | None = None, download: bool = True):
    """Images [N, 784] as float32 intensities in [0, 1] and labels [N] int64.

    ``root`` (or ``$HNCA_DATA_DIR``) must hold the files; only the default cache directory is
    downloaded into (when ``download``).
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory, may_download, source = _locate(root)
    arrays = []
    for name in _SPLITS[split]:
        data = _read_file(directory, name)
        if data is None and may_download and download:
            _download(directory, name)
            data = _read_file(directory, name)
        if data is None:
            if source == "HNCA_DATA_DIR":
                hint = "the directory HNCA_DATA_DIR names; check it, or unset it to download into the cache"
            elif not may_download:
                hint = "pass the directory of the four IDX files, or set HNCA_DATA_DIR, or leave both out to download"
            else:
                hint = "download disabled"
            raise MNISTError(f"{name}[.gz] not found in {directory} ({hint})")
        if hashlib.md5(data).hexdigest() != MNIST_FILES[name]:
            raise MNISTError(f"{directory / name}: checksum mismatch (corrupt or truncated file); delete it and retry")
        arrays.append(_parse_idx(data, name))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise MNISTError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return _tensors(images, labels)


def _tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, H, W] and integer labels [N] -> intensities [N, H*W] float32, labels int64:
    the one conversion every data set goes through, so that equal files give equal tensors."""
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    return x, torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- torchvision data sets

# --dataset name -> (torchvision.datasets class, its keyword arguments, label offset, transpose)
_TORCHVISION = {
    "mnist-torchvision": ("MNIST", {}, 0, False),
    "fashion-mnist": ("FashionMNIST", {}, 0, False),
    "kmnist": ("KMNIST", {}, 0, False),
    # labels 1..26 (0 is an unused 'N/A' class); images stored transposed, turned upright here
    "emnist-letters": ("EMNIST", {"split": "letters"}, 1, True),
}
DATASETS = ("mnist", *_TORCHVISION)
DATASET_NAMES = {"mnist": "MNIST", "mnist-torchvision": "MNIST (torchvision)", "fashion-mnist": "Fashion-MNIST",
                 "kmnist": "KMNIST", "emnist-letters": "EMNIST letters"}


def default_torchvision_root() -> Path:
    return default_cache_dir().parent / "torchvision"


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, download: bool = True):
    """Intensities [N, 784] float32 in [0, 1], labels [N] int64 in 0..C-1, and C, the data set's
    number of classes, of data set ``name`` (one of ``DATASETS``). Raises DatasetError.

    >>> x, y, classes = load_dataset("emnist-letters", "test", root="~/data")  # classes == 26
    """
    if name == "mnist":
        return (*load_mnist(split, root, download), 10)
    if name not in _TORCHVISION:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        import torchvision
        import torchvision.datasets
    except Exception as exc:  # absent, or built for another torch (which fails on import)
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "torchvision"
        why = "which is not installed" if missing else f"which cannot be imported ({type(exc).__name__}: {exc})"
        raise DatasetError(f"{name} needs torchvision, {why}: pip install torchvision, or the package's "
                           "'vision' extra") from None
    class_name, kwargs, offset, transpose = _TORCHVISION[name]
    if root is not None or os.environ.get("HNCA_DATA_DIR"):
        directory, may_download = Path(root if root is not None else os.environ["HNCA_DATA_DIR"]), False
    else:
        directory, may_download = default_torchvision_root(), download
    raw = directory / class_name / "raw"
    try:
        dataset = getattr(torchvision.datasets, class_name)(str(directory), train=split == "train",
                                                            download=may_download, **kwargs)
    except Exception as exc:  # torchvision's own errors: not found, failed download, bad file
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        if "not found" in detail and not may_download:
            raise DatasetError(f"no {class_name} files in {raw} (a torchvision root holds {class_name}/raw/; "
                               "pass --data-dir or HNCA_DATA_DIR, or leave both unset to download into "
                               f"{default_torchvision_root()})") from None
        action = "download or read" if may_download else "read"
        raise DatasetError(f"cannot {action} {class_name} in {raw}: {detail}") from None
    images, labels = dataset.data.numpy(), dataset.targets.numpy() - offset
    if transpose:
        images = images.transpose(0, 2, 1)
    classes = len([c for c in dataset.classes if c != "N/A"])
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{raw}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    if labels.size and not 0 <= labels.min() <= labels.max() < classes:
        raise DatasetError(f"{raw}: {split} labels outside 0..{classes - 1}")
    return (*_tensors(images, labels), classes)


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
