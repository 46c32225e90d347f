"""Labelled image data for evaluation and calibration.

Formats:
- `.npz` with `x` (uint8 NHWC images, or float NCHW arrays) and optionally `y` (int labels);
- a CIFAR python batch (pickled dict with b"data" [N, 3072] uint8 and b"labels");
- a folder with `labels.txt` ("FILE LABEL" lines) and the files in `images/` (or beside it);
- a folder of class subfolders (labels are the sorted subfolder indices).
uint8 pixels are scaled to [0, 1]; then (x - mean) / std per channel; images are resized
(bilinear) to the model's input size.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxdfq.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "Dataset", "open_dataset"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


IMAGE_CACHE = 2048  # decoded images kept per process (uint8: about 300 MB at 224x224)


@dataclass
class Dataset:
    """A lazily loaded labelled data set; `batches` yields (x float32 NCHW, y int64)."""

    name: str
    count: int
    _arrays: tuple[np.ndarray, np.ndarray | None] | None = None
    _files: list[tuple[Path, int]] | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    size: tuple[int, int] | None = None
    has_labels: bool = True
    preprocessing: Any = None  # the onnxdfq.preprocessing.Preprocessing that set mean/std, when known

    @property
    def raw(self) -> bool:
        """Raw images (uint8 pixels or image files), which need the model's preprocessing; float arrays do not."""
        return self._files is not None or (self._arrays is not None and self._arrays[0].dtype == np.uint8)

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        if self.mean is not None:
            x = x - self.mean.reshape(1, -1, 1, 1).astype(np.float32)
        if self.std is not None:
            x = x / self.std.reshape(1, -1, 1, 1).astype(np.float32)
        return x.astype(np.float32)

    def _resize(self, x: np.ndarray) -> np.ndarray:
        if self.size is None or tuple(x.shape[2:]) == tuple(self.size):
            return x
        from PIL import Image

        out = np.empty(x.shape[:2] + tuple(self.size), np.float32)
        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                image = Image.fromarray(x[i, c].astype(np.float32), mode="F")
                out[i, c] = np.asarray(image.resize((self.size[1], self.size[0]), Image.BILINEAR))
        return out

    def _load_image(self, path: Path) -> np.ndarray:
        try:
            mtime_ns = path.stat().st_mtime_ns
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
        return _decoded_image(path, mtime_ns, self.size).astype(np.float32) / 255.0

    def batches(self, batch_size: int, limit: int | None = None,
                offset: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Samples [offset, offset + limit) (to the end when limit is None) in batches of batch_size."""
        total = self.count if limit is None else min(offset + limit, self.count)
        for start in range(offset, total, batch_size):
            stop = min(start + batch_size, total)
            if self._arrays is not None:
                x, y = self._arrays
                chunk = x[start:stop]
                if chunk.dtype == np.uint8:
                    chunk = chunk.astype(np.float32) / 255.0
                    if chunk.ndim == 4 and chunk.shape[-1] in (1, 3) and chunk.shape[1] not in (1, 3):
                        chunk = chunk.transpose(0, 3, 1, 2)
                chunk = self._resize(chunk.astype(np.float32))
                labels = y[start:stop] if y is not None else np.full(stop - start, -1)
            else:
                rows = self._files[start:stop]
                chunk = np.stack([self._load_image(path) for path, _ in rows])
                labels = np.array([label for _, label in rows])
            yield self._normalise(chunk), labels.astype(np.int64)


@functools.lru_cache(maxsize=IMAGE_CACHE)
def _decoded_image(path: Path, mtime_ns: int, size: tuple[int, int] | None) -> np.ndarray:
    """An image file as uint8 CHW RGB at `size`, decoded once per process while the file is unchanged: a
    sweep's workers score every config on the same images (ImageNet val1300: decoding was a third of a
    MobileNet evaluation)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(image, np.uint8).transpose(2, 0, 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    array.setflags(write=False)
    return array


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    stat = path.stat()
    return _read_npz(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)  # a sweep's evaluation shards open the same file again and again in one worker
def _read_npz(path: Path, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays of an .npz, read once per process while the file is unchanged (read-only: callers slice them)."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    if "x" not in data:
        raise DataError(f"{path}: an .npz needs an array 'x' (images) and usually 'y' (labels); "
                        f"found {', '.join(data.files) or 'nothing'}")
    x = data["x"]
    y = data["y"].astype(np.int64).reshape(-1) if "y" in data else None
    if x.ndim != 4:
        raise DataError(f"{path}: 'x' must be 4-D (NHWC uint8 or NCHW float), got shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    if x.dtype != np.uint8 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        raise DataError(f"{path}: float 'x' of shape {list(x.shape)} looks channels-last; float samples must be "
                        "NCHW and preprocessed (raw images: uint8 NHWC, with --mean/--std)")
    for array in (x, y):
        if array is not None:
            array.setflags(write=False)
    return x, y


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles containers, bytes, numbers and numpy arrays only: a pickle that names any other callable
    (os.system, builtins.open, ...) is refused before anything runs. CIFAR python batches need no more."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                          ("_codecs", "encode")}  # bytes in protocol-2 pickles

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a data file may only hold plain "
                                         "containers, numbers, bytes and numpy arrays")
        return super().find_class(module, name)


def _load_plain_pickle(path: Path):
    with open(path, "rb") as handle:
        return _PlainDataUnpickler(handle, encoding="bytes").load()


def _from_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_plain_pickle(path)
    data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), np.int64)
    return data, labels


def _is_cifar_batch(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] != b"\x80":
            return False
        batch = _load_plain_pickle(path)
        return isinstance(batch, dict) and b"data" in batch
    except pickle.UnpicklingError as exc:
        if "refusing to load" in str(exc):
            raise DataError(f"{path}: {exc}") from None
        return False
    except Exception:
        return False


def _labelled_folder(path: Path) -> list[tuple[Path, int]]:
    labels_file = path / "labels.txt"
    image_dir = path / "images" if (path / "images").is_dir() else path
    rows = []
    for number, line in enumerate(labels_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[-1].lstrip("-").isdigit():
            raise DataError(f"{labels_file}:{number}: expected 'FILE LABEL', got {line!r}")
        file_path = image_dir / " ".join(parts[:-1])
        if not file_path.exists():
            raise DataError(f"{labels_file}:{number}: {file_path} does not exist")
        rows.append((file_path, int(parts[-1])))
    return rows


def _class_folders(path: Path) -> list[tuple[Path, int]]:
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    rows = []
    for index, folder in enumerate(classes):
        for file_path in sorted(folder.iterdir()):
            if file_path.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((file_path, index))
    return rows


def open_dataset(path: str | os.PathLike, *, mean: list[float] | None = None, std: list[float] | None = None,
                 size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Open `path` in whichever supported format it is; a DataError names what is wrong."""
    path = Path(path)
    mean_arr = np.asarray(mean, np.float32) if mean else None
    std_arr = np.asarray(std, np.float32) if std else None
    if std_arr is not None and np.any(std_arr == 0):
        raise DataError("--std must not contain 0")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "labels.txt").exists():
            files = _labelled_folder(path)
        else:
            files = _class_folders(path)
        if not files:
            raise DataError(f"{path}: no labels.txt and no class subfolders with images: unknown data format")
        dataset = Dataset(path.name, len(files), _files=files, mean=mean_arr, std=std_arr, size=size)
    elif path.suffix == ".npz":
        x, y = _from_npz(path)
        dataset = Dataset(path.name, len(x), _arrays=(x, y), mean=mean_arr, std=std_arr, size=size,
                          has_labels=y is not None)
    elif _is_cifar_batch(path):
        dataset = Dataset(path.name, 0, _arrays=_from_cifar_batch(path), mean=mean_arr, std=std_arr, size=size)
        dataset.count = len(dataset._arrays[0])
    else:
        raise DataError(f"{path}: unknown data format (expected .npz, a CIFAR python batch, a folder with "
                        "labels.txt, or a folder of class subfolders)")
    if channels is not None:
        for stats, flag in ((mean_arr, "--mean"), (std_arr, "--std")):
            if stats is not None and stats.size not in (1, channels):
                raise DataError(f"{flag} has {stats.size} values but the model takes {channels} channels")
    return dataset
