"""Fashion-MNIST loading: the bundled copy is the canonical data set; bad files are named."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct

import numpy as np
import pytest
import torch

from normzoo.harness.config import RunConfig
from normzoo.harness.launch import launch
from normzoo.workloads.data import DataError, bundled_dir, load_fashion_mnist, read_idx


@pytest.fixture(scope="module")
def bundled():
    return load_fashion_mnist()


def test_bundled_files_match_their_checksums():
    directory = bundled_dir()
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name
    assert "MIT" in (directory / "LICENSE").read_text()


def test_bundled_data_is_the_canonical_split(bundled):
    assert bundled.train.images.shape == (60000, 1, 28, 28)
    assert bundled.test.images.shape == (10000, 1, 28, 28)
    assert bundled.train.images.dtype == torch.float32 and bundled.train.labels.dtype == torch.int64
    assert torch.bincount(bundled.train.labels).tolist() == [6000] * 10
    assert torch.bincount(bundled.test.labels).tolist() == [1000] * 10
    # figures from the data's provenance notes
    assert abs(bundled.train.images.mean().item() - 0.2861) < 5e-4
    assert abs(bundled.train.images.std().item() - 0.3528) < 5e-4
    assert abs(bundled.test.images.mean().item() - 0.2869) < 5e-4
    assert bundled.train.images.min() == 0.0 and bundled.train.images.max() == 1.0


def test_plain_and_torchvision_layouts_give_the_same_data(tmp_path, bundled):
    plain = tmp_path / "plain"
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    plain.mkdir()
    raw.mkdir(parents=True)
    for source in bundled_dir().glob("*.gz"):
        shutil.copy(source, plain / source.name)  # gzipped
        (raw / source.stem).write_bytes(gzip.decompress(source.read_bytes()))  # not gzipped
    for directory in (plain, tmp_path / "tv"):
        data = load_fashion_mnist(directory)
        assert torch.equal(data.test.images, bundled.test.images)
        assert torch.equal(data.train.labels, bundled.train.labels)


@pytest.fixture
def data_copy(tmp_path):
    for source in bundled_dir().glob("t10k-labels*"):
        shutil.copy(source, tmp_path / source.name)
    return tmp_path


def test_missing_file_is_named(data_copy):
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found in .*--download"
    ):
        load_fashion_mnist(data_copy)


def test_truncated_gzip_is_named(data_copy):
    path = data_copy / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=f"cannot read {path}"):
        read_idx(path, ndim=1)


def test_truncated_payload_is_named(data_copy):
    path = data_copy / "t10k-labels-idx1-ubyte"
    path.write_bytes(gzip.decompress((data_copy / "t10k-labels-idx1-ubyte.gz").read_bytes())[:-10])
    with pytest.raises(
        DataError, match=f"{path} is truncated or padded: .* 10000 bytes .* found 9990"
    ):
        read_idx(path, ndim=1)


def test_wrong_magic_is_named(data_copy):
    path = data_copy / "junk"
    path.write_bytes(b"PK\x03\x04 not an idx file at all")
    with pytest.raises(DataError, match=f"{path} is not an IDX file"):
        read_idx(path, ndim=1)
    with pytest.raises(DataError, match="expected unsigned bytes with 3"):
        read_idx(data_copy / "t10k-labels-idx1-ubyte.gz", ndim=3)


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an uncompressed IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def train_files(tmp_path):
    """A data directory holding the bundled training files (linked) and no test files."""
    for source in bundled_dir().glob("train-*"):
        (tmp_path / source.name).symlink_to(source)
    return tmp_path


def test_images_that_are_not_28x28_are_named_with_their_shape(train_files):
    write_idx(train_files / "t10k-images-idx3-ubyte", np.zeros((5, 32, 32)))
    write_idx(train_files / "t10k-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(DataError) as caught:
        load_fashion_mnist(train_files)
    message = str(caught.value)
    assert str(train_files / "t10k-images-idx3-ubyte") in message
    assert "32x32" in message and "(5, 32, 32)" in message and "28x28" in message


def test_an_empty_test_set_is_an_error_not_accuracy_zero(train_files, tmp_path):
    write_idx(train_files / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28)))
    write_idx(train_files / "t10k-labels-idx1-ubyte", np.zeros(0))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte holds 0 images; the test split"):
        load_fashion_mnist(train_files)
    runs = tmp_path / "runs"
    config = RunConfig(data_dir=str(train_files), runs_dir=str(runs), epochs=1, device="cpu")
    with pytest.raises(DataError, match="holds 0 images"):
        launch(config, progress=False)
    assert not runs.exists()


def test_a_data_dir_that_does_not_exist_or_is_a_file_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError, match=f"^--data-dir {tmp_path / 'nope'} does not exist; "):
        load_fashion_mnist("~/nope")  # "~" is expanded, also after "--data-dir="
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match="afile is a file, not a directory"):
        load_fashion_mnist(tmp_path / "afile")


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    """Offline for real: torchvision's HTTP requests go to a proxy port that refuses them."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    with pytest.raises(DataError) as caught:
        load_fashion_mnist(tmp_path / "fmnist", download_missing=True)
    message = str(caught.value)
    assert message.startswith(f"download into {tmp_path / 'fmnist'} failed (")
    assert "without internet" in message and "\n" not in message
    assert caught.value.__cause__ is not None


def test_download_into_a_path_under_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match="cannot create --data-dir .*afile/fmnist"):
        load_fashion_mnist(tmp_path / "afile" / "fmnist", download_missing=True)
