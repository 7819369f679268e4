"""Built-in data sets, held whole as tensors so a batch is one indexing operation.

Images stay uint8 until a batch is taken (a quarter of float32's memory) and
are scaled to [0, 1] there, as the seeds' ``ToTensor`` does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from etappe.checkpoint.fsio import replace
from etappe.data.idx import read_idx
from etappe.errors import DataError, UsageError


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know of a data set: one sample's shape and the outputs it must produce."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int | None  # None for regression
    num_outputs: int
    input_scale: float = 1.0  # raw stored value * input_scale = model input
    # [lo, hi] of the model inputs (after scaling) the set holds: predict warns when an input is far outside it
    input_range: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "num_outputs": self.num_outputs,
            "input_scale": self.input_scale,
            "input_range": list(self.input_range) if self.input_range is not None else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        bounds = d.get("input_range")
        return cls(d["name"], tuple(d["input_shape"]), d["num_classes"], d["num_outputs"], d.get("input_scale", 1.0),
                   tuple(bounds) if bounds is not None else None)


class TensorData(torch.utils.data.Dataset):
    """Inputs and targets as two tensors. ``batch(idx)`` takes a whole batch by indexing."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, input_scale: float = 1.0) -> None:
        if len(x) != len(y):
            raise DataError(f"inputs and targets differ in length: {len(x)} inputs, {len(y)} targets")
        self.x, self.y, self.input_scale = x, y, input_scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scaled(self.x[idx]), self.y[idx]

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` for a sampler's indices (1-d int64, non-negative, on the data's device) by index_select,
        which takes a small batch in less than half the time of ``x[idx]`` on CPU."""
        return self._scaled(torch.index_select(self.x, 0, idx)), torch.index_select(self.y, 0, idx)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else x.float().mul_(self.input_scale)

    def to(self, device: torch.device | str) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device), self.input_scale)


@dataclass(frozen=True)
class Dataset:
    train: TensorData
    test: TensorData
    spec: DataSpec


# ---------------------------------------------------------------- synthetic sets


def linear(seed: int = 0, n: int = 500, noise: float = 0.01) -> Dataset:
    """The seed's y = 0.7 x + 0.3 on [0, 1), with a little Gaussian noise; 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g)
    y = 0.7 * x + 0.3 + noise * torch.randn(n, 1, generator=g)
    cut = int(0.8 * n)
    spec = DataSpec("linear", (1,), None, 1, input_range=(0.0, 1.0))
    return Dataset(TensorData(x[:cut], y[:cut]), TensorData(x[cut:], y[cut:]), spec)


def sine(seed: int = 0, n: int = 1000) -> Dataset:
    """sin(x) for x drawn uniformly on [-2, 2]; 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    y = torch.sin(x)
    cut = int(0.8 * n)
    spec = DataSpec("sine", (1,), None, 1, input_range=(-2.0, 2.0))
    return Dataset(TensorData(x[:cut], y[:cut]), TensorData(x[cut:], y[cut:]), spec)


# ---------------------------------------------------------------- real sets


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), 80/20 split.

    The split is fixed (it does not follow ``seed``) so every run tests on the same images.
    """
    table = np.loadtxt(_sklearn_file("datasets/data/digits.csv.gz"), delimiter=",")  # 64 pixels, then the label
    x = torch.from_numpy(table[:, :64].astype(np.uint8).reshape(-1, 1, 8, 8))  # values 0..16
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(20240601))
    cut = len(x) - 360
    train, test = order[:cut], order[cut:]
    scale = 1.0 / 16
    spec = DataSpec("digits", (1, 8, 8), 10, 10, scale, (0.0, 1.0))  # pixels 0..16, / 16
    return Dataset(TensorData(x[train], y[train], scale), TensorData(x[test], y[test], scale), spec)


def _sklearn_file(relative: str) -> Path:
    """A data file bundled with scikit-learn, found without importing it (``sklearn.datasets`` takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits data set comes with scikit-learn, which is not installed: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DataError(f"scikit-learn is installed but its bundled file {path} is missing; reinstall scikit-learn")
    return path


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# md5 of the published gzipped files, checked after a download.
MIRRORS = {
    "mnist": (
        ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")], "mnist": [Path("/usr/share/datasets/mnist")]}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "etappe"


def search_dirs(name: str, data_dir: str | Path | None) -> list[Path]:
    """Where the files of data set ``name`` are looked for, in order."""
    dirs = []
    if data_dir:
        dirs += [Path(data_dir) / name, Path(data_dir)]
    if os.environ.get("ETAPPE_DATA"):
        dirs += [Path(os.environ["ETAPPE_DATA"]) / name, Path(os.environ["ETAPPE_DATA"])]
    dirs.append(cache_dir() / name)
    dirs += SYSTEM_DIRS.get(name, [])
    return dirs


def find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def idx_set(name: str, directory: Path) -> Dataset:
    """Load the four standard IDX files from ``directory``."""
    paths = {key: find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{directory}: missing IDX files {', '.join(missing)} (plain or .gz)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{directory}: {split} images shaped {images.shape} and labels shaped {labels.shape}; "
                "expected (N, height, width) images and N labels"
            )
    num_classes = int(max(arrays["train_y"].max(), arrays["test_y"].max())) + 1
    scale = 1.0 / 255 if arrays["train_x"].dtype == np.uint8 else 1.0
    # 8-bit pixels span [0, 1] after scaling; other IDX types: the values the training images hold
    bounds = (0.0, 1.0) if scale != 1.0 else (float(arrays["train_x"].min()), float(arrays["train_x"].max()))

    def split(key: str) -> TensorData:
        x = torch.from_numpy(arrays[f"{key}_x"].copy()).unsqueeze(1)
        y = torch.from_numpy(arrays[f"{key}_y"].astype(np.int64))
        return TensorData(x, y, scale)

    height, width = arrays["train_x"].shape[1:]
    spec = DataSpec(name, (1, height, width), num_classes, num_classes, scale, bounds)
    return Dataset(split("train"), split("test"), spec)


def download(name: str, target: Path) -> None:
    """Fetch the four files of ``name`` into ``target``, checking each file's md5."""
    urls, sums = MIRRORS[name]
    target.mkdir(parents=True, exist_ok=True)
    for filename, md5 in sums.items():
        if (target / filename).is_file():
            continue
        errors = []
        for base in urls:
            try:
                with urllib.request.urlopen(base + filename, timeout=30) as response, tempfile.NamedTemporaryFile(
                    dir=target, delete=False
                ) as tmp:
                    shutil.copyfileobj(response, tmp)
                digest = hashlib.md5(Path(tmp.name).read_bytes()).hexdigest()
                if digest != md5:
                    os.unlink(tmp.name)
                    errors.append(f"{base}: md5 {digest}, expected {md5}")
                    continue
                replace(Path(tmp.name), target / filename)
                break
            except (urllib.error.URLError, OSError) as exc:
                errors.append(f"{base}: {exc}")
        else:
            files = ", ".join(sums)
            raise DataError(
                f"data set {name!r} not found locally and the download failed ({errors[-1]}); "
                f"put {files} into {target} or pass --data-dir DIR"
            )


def named_idx_set(name: str, data_dir: str | Path | None, allow_download: bool) -> Dataset:
    for directory in search_dirs(name, data_dir):
        if all(find_idx(directory, stem) for stem in IDX_FILES.values()):
            return idx_set(name, directory)
    target = cache_dir() / name
    if not allow_download:
        raise DataError(f"data set {name!r} not found; put its four IDX files into {target} or pass --data-dir DIR")
    download(name, target)
    return idx_set(name, target)


NAMES = ("digits", "mnist", "fashion-mnist", "linear", "sine")


def load_dataset(
    name: str, *, data_dir: str | Path | None = None, seed: int = 0, allow_download: bool = True
) -> Dataset:
    """A built-in data set by name: ``digits``, ``mnist``, ``fashion-mnist``, ``linear``, ``sine``,
    or ``idx:DIR`` for the four standard IDX files in DIR."""
    if name.startswith("idx:"):
        directory = Path(name[4:])
        if not directory.is_dir():
            raise DataError(f"idx data folder {directory} does not exist; expected a folder holding the four IDX files")
        return idx_set(name, directory)
    if name == "digits":
        return digits()
    if name == "linear":
        return linear(seed=seed)
    if name == "sine":
        return sine(seed=seed)
    if name in MIRRORS:
        return named_idx_set(name, data_dir, allow_download)
    raise UsageError(f"unknown data set {name!r}; choose one of: {', '.join(NAMES)}, or idx:DIR")
