"""Data sources: each returns a `Dataset` of uint8 image tensors and int64 labels.

- `digits`: scikit-learn's bundled 8x8 digits, the embedded default that works
  offline on any machine.
- `mnist`: torchvision's MNIST; reads an existing root, downloads when online.
- `cifar10`: torchvision's CIFAR-10 when its files are under the data root,
  else the offline JPEG pack (`cifar10-jpeg/cifar10_jpeg.npz`), else a download.
- `cifar100`: CIFAR-100's pickles (`cifar-100-python/`, as torchvision downloads them).

The data root comes from the experiment file (`data_dir`), else the
`CL_DATA_DIR` environment variable, else `~/.cache/cl-lab/data`.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from streams.experience import BatchTransform, Dataset, TensorData, reshape_images
from streams.validation import DataError

DEFAULT_DATA_DIR = Path.home() / ".cache" / "cl-lab" / "data"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is neither on disk nor downloadable; the message says where we looked."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("CL_DATA_DIR")
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR


#: Why downloads are off here (`no_downloads`), or None where a dataset may be downloaded.
_no_downloads: contextvars.ContextVar[str | None] = contextvars.ContextVar("no_downloads", default=None)


@contextlib.contextmanager
def no_downloads(reason: str):
    """Within it, a dataset that is not on disk is a DatasetNotFoundError that gives `reason`,
    whatever its `download` says: nothing is fetched and no folder is made for it (a preview
    shows what is there; it does not go to the network nor write to the data root)."""
    token = _no_downloads.set(reason)
    try:
        yield
    finally:
        _no_downloads.reset(token)


def _may_download(download: bool) -> bool:
    """`download`, unless within `no_downloads` (an error is not cached: its message reads it then)."""
    return download and _no_downloads.get() is None


def _why_not_downloaded() -> str:
    return _no_downloads.get() or "Set `download: true` to fetch it (needs internet)."


def _not_found(name: str, looked: list[Path], how: str, cause: Exception | None = None) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in looked)
    msg = (f"dataset '{name}' not found; looked in: {where}. {how} "
           f"Point the lab at a folder that has it with `data_dir:` in the experiment file or the CL_DATA_DIR "
           f"environment variable.")
    if cause is not None:
        msg += f" (download failed: {type(cause).__name__}: {cause})"
    return DatasetNotFoundError(msg)


def digits(data_dir: str | None = None, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits (UCI optdigits test set), split
    stratified with a fixed seed so every run sees the same train/test split: of each
    class, round(n * test_fraction) samples drawn by `numpy.random.default_rng(0)` are
    its test samples."""
    images, target = _digits_arrays()
    # Pixel values are 0..16; scale to the uint8 range the image pipeline expects.
    x = np.rint(images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = target.astype(np.int64)
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test[rng.permutation(members)[: round(len(members) * test_fraction)]] = True
    x_tr, y_tr, x_te, y_te = x[~test], y[~test], x[test], y[test]
    mean = float(x_tr.mean() / 255.0)
    std = float(x_tr.std() / 255.0)
    return Dataset(
        name="digits",
        train=TensorData(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        test=TensorData(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        transform=BatchTransform(mean=[mean], std=[std]),
        class_names=[str(c) for c in range(10)],
    )


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The images (n, 8, 8) and labels of scikit-learn's bundled digits. Read from the file
    `load_digits` reads (64 pixel columns, then the label), found without importing
    scikit-learn: importing `sklearn.datasets` takes over a second (SciPy), thirty times the
    read, on every process that starts with this dataset. `load_digits` if the file moved."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.exists():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


@lru_cache(maxsize=4)
def _mnist_tensors(root: str, download: bool):
    import torchvision

    raw = Path(root) / "MNIST" / "raw"

    def split(train: bool):
        files = [raw / f"{prefix}-{kind}-idx{d}-ubyte" for prefix in ("train", "t10k")
                 for kind, d in (("images", 3), ("labels", 1))]
        if all(f.is_file() for f in files):
            # The files are there: a failure to read them is damage, not absence.
            try:
                ds = torchvision.datasets.MNIST(root, train=train, download=False)
            except Exception as err:
                sizes = ", ".join(f"{f.name} {f.stat().st_size} bytes" for f in files)
                raise DataError(f"MNIST files under {raw} are corrupt or truncated ({sizes}): {err}") from err
            return TensorData(ds.data[:, None].contiguous(), ds.targets.long())
        try:
            ds = torchvision.datasets.MNIST(root, train=train, download=False)
        except RuntimeError:
            if not download:
                raise _not_found("mnist", [Path(root) / "MNIST" / "raw"], _why_not_downloaded()) from None
            try:
                ds = torchvision.datasets.MNIST(root, train=train, download=True)
            except Exception as err:  # network errors come in many types
                raise _not_found("mnist", [Path(root) / "MNIST" / "raw"],
                                 "torchvision could not download it either.", err) from err
        return TensorData(ds.data[:, None].contiguous(), ds.targets.long())

    return split(True), split(False)


def mnist(data_dir: str | None = None, download: bool = True, size: int | None = None,
          channels: int = 1) -> Dataset:
    """MNIST (LeCun et al. 1998), 60,000 train and 10,000 test images, 28x28.

    `size` and `channels` reshape the images for a backbone made for other inputs (e.g. a
    ViT pre-trained on 32x32 colour images: `size: 32, channels: 3`): bilinear resizing, the
    grey channel repeated. MNIST's own mean and standard deviation normalise every channel, so
    the inputs are about zero-mean and unit-variance per channel, as a backbone's own
    normalised data were (upsampling smooths the digits: at 32x32 the standard deviation is
    about 7% below 1, more at larger sizes)."""
    if (size is not None and size < 1) or channels < 1:
        raise ValueError(f"mnist: size and channels must be positive, got size={size}, channels={channels}")
    train, test = _mnist_tensors(str(data_root(data_dir)), _may_download(download))
    if size not in (None, 28) or channels != 1:
        side = size or 28
        train, test = (TensorData(reshape_images(d.x, side, channels), d.y) for d in (train, test))
    return Dataset("mnist", train, test, BatchTransform(mean=[0.1307] * channels, std=[0.3081] * channels),
                   class_names=[str(c) for c in range(10)])


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, where: str) -> torch.Tensor:
    from PIL import Image

    def one(i: int) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{where}: image {i} is corrupt or truncated ({err})") from err

    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        images = list(pool.map(one, range(len(offsets) - 1), chunksize=512))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@lru_cache(maxsize=2)
def _cifar10_tensors(root: str, download: bool):
    import torchvision

    base = Path(root)
    pack = base / "cifar10-jpeg" / "cifar10_jpeg.npz"
    torchvision_dir = base / "cifar-10-batches-py"

    def from_torchvision(train: bool, dl: bool) -> TensorData:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=dl)
        return TensorData(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    if torchvision_dir.exists():
        return from_torchvision(True, False), from_torchvision(False, False)
    if pack.exists():
        try:
            with np.load(pack) as z:
                arrays = {k: z[k] for k in ("train_jpeg", "train_off", "train_y", "test_jpeg", "test_off", "test_y")}
        except Exception as err:
            raise DataError(f"CIFAR-10 JPEG pack {pack} is corrupt or truncated: {err}") from err
        train = TensorData(_decode_jpegs(arrays["train_jpeg"], arrays["train_off"], f"{pack} train_jpeg"),
                           torch.from_numpy(arrays["train_y"].astype(np.int64)))
        test = TensorData(_decode_jpegs(arrays["test_jpeg"], arrays["test_off"], f"{pack} test_jpeg"),
                          torch.from_numpy(arrays["test_y"].astype(np.int64)))
        return train, test
    looked = [torchvision_dir, pack]
    if not download:
        raise _not_found("cifar10", looked, _why_not_downloaded())
    try:
        return from_torchvision(True, True), from_torchvision(False, True)
    except Exception as err:
        raise _not_found("cifar10", looked, "torchvision could not download it either.", err) from err


def cifar10(data_dir: str | None = None, download: bool = True, augment: bool = False) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009), 50,000 train and 10,000 test images, 32x32 RGB.

    `augment` adds the usual random crop (padding 4) and horizontal flip to training batches.
    """
    train, test = _cifar10_tensors(str(data_root(data_dir)), _may_download(download))
    transform = BatchTransform(CIFAR10_MEAN, CIFAR10_STD, crop_padding=4 if augment else 0, flip=augment)
    return Dataset("cifar10", train, test, transform, class_names=list(CIFAR10_CLASSES))


#: CIFAR-100's training-set per-channel statistics.
CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's pickles hold dicts, lists, strings and numpy arrays; any other global a file
    names (code to run) is refused, so a corrupt or planted file cannot reach past its place."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def _cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as err:
        raise DataError(f"CIFAR file {path} is corrupt or not CIFAR's pickle ({type(err).__name__}: {err})") from err


def _cifar100_split(folder: Path, split: str) -> TensorData:
    batch = _cifar_pickle(folder / split)
    if not isinstance(batch, dict) or "data" not in batch or "fine_labels" not in batch:
        raise DataError(f"CIFAR-100 file {folder / split} has no `data` and `fine_labels`")
    x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return TensorData(torch.from_numpy(x.copy()), torch.tensor(list(batch["fine_labels"]), dtype=torch.long))


def cifar100(data_dir: str | None = None, download: bool = True, augment: bool = False) -> Dataset:
    """CIFAR-100 (Krizhevsky 2009), 50,000 train and 10,000 test images of 100 classes (the
    fine labels), 32x32 RGB, from `cifar-100-python/` under the data root (train, test and
    meta, CIFAR's pickles as torchvision downloads them; downloaded when online). `augment`
    adds the usual random crop (padding 4) and horizontal flip to training batches."""
    root = data_root(data_dir)
    folder = root / "cifar-100-python"
    if not (folder / "train").is_file():
        if not _may_download(download):
            raise _not_found("cifar100", [folder], _why_not_downloaded())
        try:
            import torchvision

            torchvision.datasets.CIFAR100(str(root), train=True, download=True)
        except Exception as err:
            raise _not_found("cifar100", [folder], "torchvision could not download it either.", err) from err
    train, test = _cifar100_split(folder, "train"), _cifar100_split(folder, "test")
    meta = _cifar_pickle(folder / "meta") if (folder / "meta").is_file() else {}
    names = list(meta.get("fine_label_names", [])) if isinstance(meta, dict) else []
    transform = BatchTransform(CIFAR100_MEAN, CIFAR100_STD, crop_padding=4 if augment else 0, flip=augment)
    return Dataset("cifar100", train, test, transform, class_names=names)
