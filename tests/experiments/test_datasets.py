"""--dataset through torchvision: a torchvision-style root built from the shared MNIST IDX files
gives exactly the package reader's tensors; the class count, EMNIST's labels and orientation; the
one-line errors without torchvision or files; --dataset in config.json and on --resume; sample
grids by torchvision.utils (and the matplotlib fallback)."""

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hnca_kernels.cli import main
from hnca_kernels.data import DatasetError, load_dataset, load_mnist
from hnca_kernels.experiments.rundir import CHECKPOINT, CONFIG, METRICS, read_metrics

from paths import ROOT  # noqa: E402
from paths import SHARED  # noqa: E402
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SHARED / "t10k-labels-idx1-ubyte.gz").exists(),
                                                  reason=f"no MNIST files in {SHARED}")]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
TINY = ["--limit-train", "200", "--limit-test", "50", "--no-progress"]


def _idx_labels(labels: np.ndarray) -> bytes:
    return bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def tv_root(tmp_path_factory):
    """A torchvision root: MNIST/raw (the shared files, uncompressed); FashionMNIST/raw and
    KMNIST/raw linking to the same files; EMNIST/raw with the letters split made of MNIST's images
    and its labels + 1 (EMNIST letters' labels are 1..26)."""
    root = tmp_path_factory.mktemp("torchvision")
    mnist = root / "MNIST" / "raw"
    mnist.mkdir(parents=True)
    for images, labels in FILES.values():
        for name in (images, labels):
            with gzip.open(SHARED / f"{name}.gz") as src, open(mnist / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    for folder in ("FashionMNIST", "KMNIST"):
        (root / folder / "raw").mkdir(parents=True)
        for name in os.listdir(mnist):
            (root / folder / "raw" / name).symlink_to(mnist / name)
    emnist = root / "EMNIST" / "raw"
    emnist.mkdir(parents=True)
    for split, (images, labels) in FILES.items():
        (emnist / f"emnist-letters-{split}-images-idx3-ubyte").symlink_to(mnist / images)
        _, y = load_mnist(split, root=SHARED)
        (emnist / f"emnist-letters-{split}-labels-idx1-ubyte").write_bytes(_idx_labels(y.numpy() + 1))
    return root


@pytest.fixture(scope="module")
def torchvision():
    return pytest.importorskip("torchvision")


@pytest.mark.parametrize("split", ["train", "test"])
def test_torchvision_mnist_equals_the_package_reader(torchvision, tv_root, split):
    x, y, classes = load_dataset("mnist-torchvision", split, root=tv_root)
    x0, y0 = load_mnist(split, root=SHARED)
    assert classes == 10 and x.dtype == x0.dtype and y.dtype == y0.dtype
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert x.shape == ((60000 if split == "train" else 10000), 784)
    x_own, y_own, own_classes = load_dataset("mnist", split, root=SHARED)
    assert own_classes == 10 and torch.equal(x_own, x0) and torch.equal(y_own, y0)


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_each_data_set_reads_its_own_folder(torchvision, tv_root, name, tmp_path):
    x, y, classes = load_dataset(name, "test", root=tv_root)
    x0, y0 = load_mnist("test", root=SHARED)  # the fake folders link MNIST's files
    assert classes == 10 and torch.equal(x, x0) and torch.equal(y, y0)
    folder = {"fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}[name]
    with pytest.raises(DatasetError) as info:
        load_dataset(name, "test", root=tmp_path)
    assert str(info.value).startswith(f"no {folder} files in {tmp_path / folder / 'raw'} (a torchvision root holds ")
    assert "\n" not in str(info.value)


def test_emnist_letters_labels_from_zero_and_images_upright(torchvision, tv_root):
    x, y, classes = load_dataset("emnist-letters", "test", root=tv_root)
    x0, y0 = load_mnist("test", root=SHARED)
    assert classes == 26
    assert torch.equal(y, y0)  # files hold MNIST's labels + 1: mapped back to 0..
    assert torch.equal(x.view(-1, 28, 28), x0.view(-1, 28, 28).transpose(1, 2))  # stored transposed


def test_env_root_and_no_download_into_it(torchvision, tv_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HNCA_DATA_DIR", str(tv_root))
    x, _, _ = load_dataset("mnist-torchvision", "test")
    assert x.shape == (10000, 784)
    monkeypatch.setenv("HNCA_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="no MNIST files in"):
        load_dataset("mnist-torchvision", "test")
    assert not (tmp_path / "MNIST").exists()  # nothing downloaded into a directory the user named


def _blocked_torchvision(*argv):
    code = ("import sys; sys.modules['torchvision'] = None; from hnca_kernels.cli import main; "
            "raise SystemExit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_without_torchvision_one_line_error_and_matplotlib_grid(tv_root, tmp_path):
    proc = _blocked_torchvision("bandit", "--dataset", "fashion-mnist", "--data-dir", str(tv_root), *TINY,
                                "--out", str(tmp_path / "run"))
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "No CUDA runtime" not in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines == ["hnca bandit: cannot load Fashion-MNIST: fashion-mnist needs torchvision, which is not installed: "
                     "pip install torchvision, or the package's 'vision' extra"]
    assert not (tmp_path / "run").exists()

    # hnca sample falls back to matplotlib: a 3 x 3 figure of 1-inch axes at 100 dpi
    assert main(["vae", "--hidden", "8", *TINY, "--test-samples", "2", "--data-dir", str(SHARED), "--epochs", "1",
                 "--out", str(tmp_path / "vae")]) == 0
    proc = _blocked_torchvision("sample", str(tmp_path / "vae"), "-o", str(tmp_path / "mpl.png"), "-n", "9")
    assert proc.returncode == 0, proc.stderr
    assert _png_size(tmp_path / "mpl.png") == (300, 300)


def test_sample_grid_by_torchvision_holds_the_generated_pixels(torchvision, tmp_path):
    from PIL import Image

    from hnca_kernels.experiments.vae import _build

    run = tmp_path / "vae"
    assert main(["vae", "--hidden", "8", *TINY, "--test-samples", "2", "--data-dir", str(SHARED), "--epochs", "1",
                 "--out", str(run)]) == 0
    assert main(["sample", str(run), "-o", str(tmp_path / "s.png"), "-n", "7", "--seed", "3"]) == 0
    vae = _build(json.loads((run / CONFIG).read_text()), "cpu")
    vae.load_state_dict(torch.load(run / CHECKPOINT, weights_only=False)["model"])
    torch.manual_seed(3)
    images = vae.generate(7).view(7, 1, 28, 28)
    grid = torchvision.utils.make_grid(images, nrow=3, padding=2, pad_value=1.0)  # 3 columns, 3 rows
    expected = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(tmp_path / "s.png"))
    assert got.shape == (3 * 30 + 2, 3 * 30 + 2, 3) and np.array_equal(got, expected)


def _metrics(run):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in read_metrics(run / METRICS)[0]]


def test_cli_on_the_torchvision_root_matches_the_package_reader(torchvision, tv_root, tmp_path, capsys):
    """End to end: bandit runs on --dataset mnist-torchvision and mnist are the same run; the data set
    is recorded in config.json and checked on --resume; emnist-letters gives a 26-way output."""
    common = ["bandit", "--width", "16", *TINY, "--epochs", "2"]
    assert main([*common, "--dataset", "mnist-torchvision", "--data-dir", str(tv_root), "--out", str(tmp_path / "tv")]) == 0
    assert main([*common, "--data-dir", str(SHARED), "--out", str(tmp_path / "own")]) == 0
    assert _metrics(tmp_path / "tv") == _metrics(tmp_path / "own")
    a = torch.load(tmp_path / "tv" / CHECKPOINT, weights_only=False)["model"]
    b = torch.load(tmp_path / "own" / CHECKPOINT, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "tv" / CONFIG).read_text())["dataset"] == "mnist-torchvision"
    assert json.loads((tmp_path / "own" / CONFIG).read_text())["dataset"] == "mnist"

    capsys.readouterr()
    assert main([*common, "--epochs", "3", "--data-dir", str(SHARED), "--out", str(tmp_path / "tv"), "--resume"]) == 1
    assert capsys.readouterr().err == (f"hnca bandit: --resume with different settings than the run in {tmp_path / 'tv'} "
                                       "(dataset 'mnist-torchvision' -> 'mnist'); use the run's settings or another --out\n")
    # a config.json from before --dataset means mnist
    config = json.loads((tmp_path / "own" / CONFIG).read_text())
    del config["dataset"]
    (tmp_path / "own" / CONFIG).write_text(json.dumps(config))
    assert main([*common, "--dataset", "kmnist", "--data-dir", str(tv_root), "--epochs", "3", "--out",
                 str(tmp_path / "own"), "--resume"]) == 1
    assert "(dataset 'mnist' -> 'kmnist')" in capsys.readouterr().err
    assert main([*common, "--data-dir", str(SHARED), "--epochs", "3", "--out", str(tmp_path / "own"), "--resume"]) == 0
    assert json.loads((tmp_path / "own" / CONFIG).read_text())["dataset"] == "mnist"

    assert main([*common, "--dataset", "emnist-letters", "--data-dir", str(tv_root), "--out", str(tmp_path / "em")]) == 0
    weights = torch.load(tmp_path / "em" / CHECKPOINT, weights_only=False)["model"]
    assert weights["1.weight"].shape == (26, 16)
    assert main(["vae", "--dataset", "fashion-mnist", "--hidden", "8", *TINY, "--test-samples", "2", "--epochs", "1",
                 "--data-dir", str(tv_root), "--out", str(tmp_path / "fv")]) == 0
    record = _metrics(tmp_path / "fv")[0]
    assert record["epoch"] == 1 and math.isfinite(record["train_elbo"]) and math.isfinite(record["test_bound"])
