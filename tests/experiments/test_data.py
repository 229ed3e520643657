"""MNIST loader (real files, uncompressed, corrupt, missing, download) and dynamic binarization."""

import gzip
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from hnca_kernels import data
from hnca_kernels.data import MNISTError, binarize, load_mnist

from paths import SHARED  # noqa: E402
needs_mnist = pytest.mark.skipif(not (SHARED / "t10k-labels-idx1-ubyte.gz").exists(), reason=f"no MNIST files in {SHARED}")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """No test may reach the network or the user's cache."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@needs_mnist
def test_train_split_counts_classes_and_mean():
    x, y = load_mnist("train", root=SHARED)
    assert x.shape == (60000, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert x.min() == 0 and x.max() == 1
    assert abs(x.double().mean().item() * 255 - 33.318) < 1e-3


@needs_mnist
def test_test_split_from_env_and_uncompressed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HNCA_DATA_DIR", str(SHARED))
    x_gz, y_gz = load_mnist("test")
    assert x_gz.shape == (10000, 784) and y_gz.shape == (10000,)
    for name in TEST_FILES:
        with gzip.open(SHARED / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    x, y = load_mnist("test", root=tmp_path)
    assert torch.equal(x, x_gz) and torch.equal(y, y_gz)


def _copy_test_files(dst: Path) -> None:
    for name in TEST_FILES:
        shutil.copy(SHARED / f"{name}.gz", dst / f"{name}.gz")


@needs_mnist
def test_truncated_gzip_is_a_clear_error(tmp_path):
    _copy_test_files(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100000])
    with pytest.raises(MNISTError, match=r"cannot read .*t10k-images-idx3-ubyte\.gz"):
        load_mnist("test", root=tmp_path)


@needs_mnist
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupt_uncompressed_file_fails_its_checksum(tmp_path, damage):
    _copy_test_files(tmp_path)
    gz = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    if damage == "flipped byte":
        raw[5000] ^= 1
    else:
        raw = raw[:-10]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(MNISTError, match=r"t10k-labels-idx1-ubyte: checksum mismatch"):
        load_mnist("test", root=tmp_path)


def test_missing_files_name_the_file_and_the_way_out(tmp_path, monkeypatch):
    with pytest.raises(MNISTError, match=r"t10k-images-idx3-ubyte\[\.gz\] not found in .*HNCA_DATA_DIR"):
        load_mnist("test", root=tmp_path)
    monkeypatch.setenv("HNCA_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(MNISTError, match="not found"):
        load_mnist("test")
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", root=tmp_path)


def test_failed_download_lists_every_mirror(monkeypatch):
    monkeypatch.delenv("HNCA_DATA_DIR", raising=False)
    with pytest.raises(MNISTError, match="could not download t10k-images") as info:
        load_mnist("test")
    assert all(mirror in str(info.value) for mirror in data.MIRRORS)
    with pytest.raises(MNISTError, match="download disabled"):
        load_mnist("test", download=False)


def _serve(files: dict[str, bytes]):
    def urlopen(url, timeout=None):
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    return urlopen


@needs_mnist
def test_download_is_verified_and_cached(monkeypatch, tmp_path):
    monkeypatch.delenv("HNCA_DATA_DIR", raising=False)
    served = {f"{n}.gz": (SHARED / f"{n}.gz").read_bytes() for n in TEST_FILES}
    monkeypatch.setattr(data.urllib.request, "urlopen", _serve(served))
    x, y = load_mnist("test")
    assert x.shape == (10000, 784)
    assert (data.default_cache_dir() / "t10k-labels-idx1-ubyte.gz").exists()

    # A mirror serving damaged bytes: rejected by the checksum, nothing left in the cache.
    shutil.rmtree(data.default_cache_dir())
    bad = dict(served, **{"t10k-labels-idx1-ubyte.gz": gzip.compress(b"\0" * 10008)})
    monkeypatch.setattr(data.urllib.request, "urlopen", _serve(bad))
    with pytest.raises(MNISTError, match="checksum mismatch"):
        load_mnist("test")
    assert not list(data.default_cache_dir().glob("t10k-labels*")) and not list(data.default_cache_dir().glob("tmp*"))


def test_binarize_mean_matches_intensity_and_draws_are_fresh():
    intensities = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([binarize(intensities.expand(1000, -1), generator=gen) for _ in range(20)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    n = draws.shape[0] * draws.shape[1]
    mean = draws.double().mean((0, 1))
    tol = 5 * (intensities.double() * (1 - intensities.double()) / n).sqrt()
    assert ((mean - intensities.double()).abs() <= tol).all()  # exact at 0 and 1
    assert not torch.equal(draws[0], draws[1])
    again = torch.Generator().manual_seed(1)
    assert torch.equal(binarize(intensities.expand(1000, -1), generator=again), draws[0])


def test_binarize_rejects_bad_input():
    with pytest.raises(TypeError, match="floating"):
        binarize(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize(torch.tensor([0.5, 255.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_binarize_cuda_data_with_cpu_generator_matches_cpu():
    x = torch.rand(64, 784)
    cpu = binarize(x, generator=torch.Generator().manual_seed(3))
    cuda = binarize(x.cuda(), generator=torch.Generator().manual_seed(3))
    assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu)
