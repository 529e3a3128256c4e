"""A workload's data as tensors (:class:`Dataset`: a train and a test :class:`Split`), and
Fashion-MNIST, the data of the bundled workloads: the bundled IDX files, or a directory of the
user's, read once.

The package ships the canonical 60,000 / 10,000 split (Zalando Research, MIT license; see
``fashion_mnist/LICENSE``). :func:`load_fashion_mnist` reads the four IDX files with numpy into
one ``uint8`` array each and returns float tensors in ``[0, 1]`` of shape ``(N, 1, 28, 28)``;
there is no per-sample Python work and no ``DataLoader``: the harness moves the tensors to the
device once and batches by indexing.

A directory given with ``data_dir`` may hold the files gzipped or not, either directly or in
torchvision's ``FashionMNIST/raw/`` layout. ``download=True`` fetches them there through
torchvision first.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from normzoo import registry
from normzoo.errors import NormzooError, call_plugin

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UBYTE = 0x08
#: The generator seed that draws a validation split (:meth:`Dataset.validation`).
VALIDATION_SEED = 0
IMAGE_SIZE = (28, 28)


class DataError(NormzooError):
    """A data file is missing, truncated or not a valid IDX file."""


@dataclass(frozen=True)
class Split:
    """Inputs (``images``: float32, ``(N, ...)``; Fashion-MNIST's are ``(N, 1, 28, 28)`` in
    ``[0, 1]``) and their class labels as int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, size: int | None) -> Split:
        """The first ``size`` examples (all of them for ``None``)."""
        if size is None or size >= len(self):
            return self
        return Split(self.images[:size], self.labels[:size])

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    """The train and test splits of a workload's data."""

    train: Split
    test: Split

    def to(self, device: torch.device) -> Dataset:
        return Dataset(self.train.to(device), self.test.to(device))

    def subset(self, train_size: int | None, test_size: int | None) -> Dataset:
        """The first ``train_size`` / ``test_size`` examples of each split (``None``: all)."""
        return Dataset(self.train.subset(train_size), self.test.subset(test_size))

    def validation(self, size: int) -> Dataset:
        """The training set without ``size`` held-out examples, and those examples in place of
        the test set, which is dropped: a run that chooses settings never reads the test set.

        The held-out examples are stratified by class (each class gives ``size // classes``,
        the first ``size % classes`` classes one more) and drawn with
        :data:`VALIDATION_SEED`, not the run's seed: every run, seed and variant holds out the
        same examples, so trials differ only in what they try. Both parts keep the order of
        the training set, so ``train_subset`` takes the first examples of what remains.
        """
        labels = self.train.labels.cpu()
        classes = int(labels.max()) + 1 if len(labels) else 0
        if not 1 <= size < len(labels):
            raise NormzooError(
                f"--val-split {size} must hold out between 1 and {len(labels) - 1:,} of the "
                f"{len(labels):,} training examples; choose a smaller split"
            )
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        held = torch.zeros(len(labels), dtype=torch.bool)
        for label in range(classes):
            members = torch.nonzero(labels == label).flatten()
            share = size // classes + (label < size % classes)
            if share > len(members):
                raise NormzooError(
                    f"--val-split {size} needs {share} examples of class {label}, the training "
                    f"set has {len(members)}; choose a smaller split"
                )
            held[members[torch.randperm(len(members), generator=generator)[:share]]] = True
        held = held.to(self.train.labels.device)
        return Dataset(
            Split(self.train.images[~held], self.train.labels[~held]),
            Split(self.train.images[held], self.train.labels[held]),
        )


def bundled_dir() -> Path:
    """Directory of the Fashion-MNIST files shipped inside the package."""
    return Path(str(resources.files("normzoo.workloads") / "fashion_mnist"))


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped when its name ends in ``.gz``).

    Parameters
    ----------
    path:
        The file.
    ndim:
        Expected number of dimensions: 3 for images, 1 for labels.

    Raises :class:`DataError` naming the file when it is unreadable, truncated, or not IDX.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad header)")
    if raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path}: IDX header says type 0x{raw[2]:02x} with {raw[3]} dimensions, "
            f"expected unsigned bytes with {ndim}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != expected:
        raise DataError(
            f"{path} is truncated or padded: header promises {expected} bytes for shape {dims}, "
            f"found {payload.size}"
        )
    return payload.reshape(dims)


def find_idx_file(directory: Path, stem: str) -> Path:
    """Locate ``stem`` (gzipped or not) in ``directory`` or its ``FashionMNIST/raw/``."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(
        f"{stem}[.gz] not found in {directory} or {directory / 'FashionMNIST' / 'raw'}; "
        "pass a directory with the four IDX files, add --download, or omit --data-dir to use "
        "the bundled copy"
    )


def _read_split(directory: Path, split: str) -> Split:
    """Read and check one split; the bundled workloads' layer sizes assume 28x28, so other
    sizes are errors here rather than a shape mismatch deep inside the model, and an empty
    file would make every accuracy a meaningless 0."""
    image_path, label_path = (find_idx_file(directory, stem) for stem in FILES[split])
    images = read_idx(image_path, ndim=3)
    labels = read_idx(label_path, ndim=1)
    if images.shape[1:] != IMAGE_SIZE:
        raise DataError(
            f"{image_path} holds images of shape {images.shape[1]}x{images.shape[2]} "
            f"(array shape {images.shape}); Fashion-MNIST images are 28x28"
        )
    if len(images) == 0:
        raise DataError(f"{image_path} holds 0 images; the {split} split must not be empty")
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels"
        )
    if labels.max(initial=0) >= len(CLASSES):
        raise DataError(f"{label_path} holds label {labels.max()}; Fashion-MNIST labels are 0-9")
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    return Split(image_tensor, torch.from_numpy(labels.astype(np.int64)))


def one_line(text: object) -> str:
    """``text`` with every run of whitespace, newlines included, collapsed to one space.

    Errors from torchvision (and torch) span several lines; ours are one line each.
    """
    return " ".join(str(text).split())


def download(directory: Path) -> None:
    """Fetch Fashion-MNIST into ``directory/FashionMNIST/raw`` through torchvision.

    Raises :class:`DataError` with one line when the directory cannot be created or the
    download fails (torchvision's own message lists every mirror over several lines).
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot create --data-dir {directory}: {error.strerror or error}"
        ) from error
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    for train in (True, False):
        try:
            TorchvisionFashionMNIST(str(directory), train=train, download=True)
        except Exception as error:  # network errors come in many types
            raise DataError(
                f"download into {directory} failed ({type(error).__name__}: "
                f"{one_line(error)}); without internet, omit --download and --data-dir to use "
                "the bundled copy"
            ) from error


def load_fashion_mnist(
    data_dir: Path | str | None = None, download_missing: bool = False
) -> Dataset:
    """Load both splits, from ``data_dir`` or from the bundled copy when it is ``None``.

    ``~`` in ``data_dir`` is expanded (``--data-dir=~/data`` reaches us unexpanded). A
    directory that does not exist is named as such, not as four missing files.
    """
    directory = Path(data_dir).expanduser() if data_dir is not None else bundled_dir()
    if download_missing:
        download(directory)
    elif not directory.exists():
        raise DataError(
            f"--data-dir {directory} does not exist; pass a directory with the four IDX files, "
            "add --download to fetch them there, or omit --data-dir to use the bundled copy"
        )
    elif not directory.is_dir():
        raise DataError(
            f"--data-dir {directory} is a file, not a directory; pass the directory that "
            "holds the four IDX files, or omit --data-dir to use the bundled copy"
        )
    return Dataset(_read_split(directory, "train"), _read_split(directory, "test"))


def load_workload_data(workload: str, data_dir: Path | str | None, download: bool) -> Dataset:
    """Workload ``workload``'s data: its own errors are one line already; any other exception
    of its ``data`` function, or something that is not a :class:`Dataset`, is a
    :class:`DataError` naming the workload and its plugin."""
    declared = registry.workload(workload)
    where = f"workload {declared.name!r} (plugin {declared.plugin!r})"
    data = call_plugin(
        declared.data,
        lambda text: DataError(f"{where}: its data function raised {text}"),
        data_dir, download,
    )  # fmt: skip
    if not isinstance(data, Dataset):
        raise DataError(
            f"{where}: its data function returned {type(data).__name__}, not a "
            "normzoo.workloads.data.Dataset (train and test Splits)"
        )
    return data
