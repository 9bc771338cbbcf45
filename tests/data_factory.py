"""Helpers that write tiny datasets in real raw formats, for tests (no network).

`write_idx_dataset` writes an MNIST-format training split (train-images-idx3-ubyte.gz and
train-labels-idx1-ubyte.gz, IDX headers, 28x28 uint8) that els.data prepares like the real thing (it
resizes to 32x32). els.data checks that a file it cannot verify by hash has the exact structure of the
training split, 60000 images, so the files hold 60000 images; a pipeline config then uses only the
first few of each class (max_train_per_class) for the machines. Images are simple class-dependent
shapes (class c: a bright bar, horizontal for even c, vertical for odd c, at a position that varies)
plus a little texture, so they are distinct, compress well and look different per class.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"
TRAIN_SPLIT_SIZE = 60000


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of a uint8 array: magic, dimensions (big-endian uint32), then the bytes."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_images(labels: np.ndarray, seed: int = 0, size: int = 28) -> np.ndarray:
    """uint8 [N, size, size]: a bar per image whose orientation depends on the class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = np.zeros((n, size, size), dtype=np.uint8)
    position = rng.integers(4, size - 8, size=n)
    length = rng.integers(10, size - 4, size=n)
    brightness = rng.integers(150, 256, size=n).astype(np.uint8)
    grid = np.arange(size)
    for i in range(n):
        start = (size - length[i]) // 2
        along = (grid >= start) & (grid < start + length[i])
        across = (grid >= position[i]) & (grid < position[i] + 4)
        mask = np.outer(across, along) if labels[i] % 2 == 0 else np.outer(along, across)
        images[i][mask] = brightness[i]
    # a little texture on the bars so that no two images are identical
    texture = rng.integers(0, 40, size=images.shape, dtype=np.uint8)
    return np.where(images > 0, images - np.minimum(images, texture), 0).astype(np.uint8)


def write_idx_dataset(
    directory: str | Path,
    *,
    num_classes: int = 2,
    num_images: int = TRAIN_SPLIT_SIZE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Write train-images/labels IDX .gz files into `directory`; return (images, labels).

    Labels cycle 0, 1, ..., num_classes - 1 in dataset order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    labels = (np.arange(num_images) % num_classes).astype(np.uint8)
    images = synthetic_images(labels, seed=seed)
    for name, content in (
        (IMAGES_FILE, idx_bytes(images, IDX_IMAGES_MAGIC)),
        (LABELS_FILE, idx_bytes(labels, IDX_LABELS_MAGIC)),
    ):
        (directory / f"{name}.gz").write_bytes(gzip.compress(content, compresslevel=1))
    return images, labels


def write_schedule(path: str | Path, scales: list[int], comment: str = "test schedule") -> Path:
    """A plain-text patch-size schedule (scales/*.txt format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {comment}\n" + " ".join(str(k) for k in scales) + "\n")
    return path
