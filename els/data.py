"""Training sets for the ELS machines, prepared once into one uint8 safetensors file.

Every dataset is reduced to the same form: all TRAINING images resized to 32x32 exactly as
``torchvision.transforms.Resize((32, 32))`` resizes a PIL image (bilinear, PIL's antialiasing),
kept as uint8 in [0, 255] with shape [N, C, 32, 32], plus int64 labels [N]. The library maps
``u -> u / 127.5 - 1`` later (ToTensor + Normalize(0.5, 0.5)).

Datasets (``DATASETS``):

- ``MNIST``, ``FashionMNIST``: IDX files as torchvision stores them (``<root>/<Name>/raw``).
- ``CIFAR10``: torchvision's python batches (``<root>/cifar-10-batches-py``). The batches are
  pickles; they are only ever unpickled by ``torchvision.datasets.CIFAR10`` and only after every
  file's md5 matched torchvision's record.
- ``imagefolder``: a folder of images; one subfolder per class (class ids follow the sorted
  subfolder names) or a flat folder (one class, id 0). CelebA is used this way: point
  ``folder`` at the folder of aligned CelebA images.

Raw files are obtained in this order: files already in the raw root; torchvision's download
(short socket timeout, any failure is caught); a local copy in ``local_dirs`` (by default
Debian's ``dataset-fashion-mnist`` package directory); for FashionMNIST, ``apt-get install
dataset-fashion-mnist`` when running as root. ``prefer_local=True`` looks at local copies before
trying the network. Everything that is read is verified first (see ``RECORDED_SHA256``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import operator
import os
import shutil
import socket
import struct
import subprocess
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from tqdm import tqdm

from .io import content_sha256, write_safetensors

logger = logging.getLogger(__name__)


def _torchvision():
    """torchvision, imported on first use: it takes about 2.5 s to import, and most users of this
    module (every workflow job that reads a prepared file, the workflow's start-up) never need it.
    (Not a lazy proxy in sys.modules: anything that walks sys.modules, such as inspect, would
    start the import there, in the middle of another import.)"""
    import torchvision

    return torchvision


# torchvision.datasets.folder.IMG_EXTENSIONS: the files an image folder's classes are read from
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DATASETS = ("MNIST", "FashionMNIST", "CIFAR10", "imagefolder")

IMAGE_SIZE = 32
FORMAT = "els-prepared-dataset"
FORMAT_VERSION = "1"

# Debian/Ubuntu package `dataset-fashion-mnist` installs the four IDX .gz files here. Debian
# re-compressed them, so torchvision's md5 of the .gz does not match; the content does.
APT_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
APT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_LOCAL_DIRS: tuple[str, ...] = (str(APT_FASHION_MNIST_DIR),)

# Short enough that a machine without network falls through to the local copy at once.
DOWNLOAD_TIMEOUT_S = 10.0

# sha256 of the DECOMPRESSED raw files: independent of how a copy was (re)compressed.
# FashionMNIST: hashed from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 (the
# zalandoresearch/fashion-mnist files). MNIST and CIFAR10 are not recorded: they are accepted
# when torchvision's md5 of the original archives/batches matches (see _verify_idx_content).
RECORDED_SHA256: dict[str, dict[str, str]] = {
    "FashionMNIST": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
    },
}


class DatasetError(RuntimeError):
    """A dataset cannot be prepared or loaded (base class of the errors below)."""


class DatasetUnavailable(DatasetError):
    """The raw files could not be found or obtained; the message says how to provide them."""


class DatasetCorrupt(DatasetError):
    """A file exists but is truncated, corrupted or not what it claims to be."""


@dataclasses.dataclass(frozen=True)
class IdxSpec:
    """What the training split of an MNIST-like dataset looks like on disk."""

    name: str
    images_file: str = "train-images-idx3-ubyte"
    labels_file: str = "train-labels-idx1-ubyte"
    num_images: int = 60000
    image_shape: tuple[int, int] = (28, 28)
    num_classes: int = 10


IDX_SPECS: dict[str, IdxSpec] = {
    "MNIST": IdxSpec("MNIST"),
    "FashionMNIST": IdxSpec("FashionMNIST"),
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


# ----------------------------------------------------------------------------- public API


def prepare_dataset(
    dataset: str,
    raw_root: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    channels: int | None = None,
    folder: str | os.PathLike | None = None,
    local_dirs: Sequence[str | os.PathLike] | None = DEFAULT_LOCAL_DIRS,
    allow_download: bool = True,
    allow_apt: bool = True,
    prefer_local: bool = False,
) -> dict[str, str]:
    """Write the whole training set of ``dataset`` to ``out_path`` (safetensors) atomically.

    Args:
        dataset: one of ``DATASETS`` (case-insensitive). CelebA: use ``"imagefolder"``.
        raw_root: torchvision root for raw files (config ``data.root``); downloads go here.
        out_path: the prepared ``.safetensors`` file (tensors ``images`` uint8 [N, C, 32, 32]
            and ``labels`` int64 [N], in dataset order).
        channels: imagefolder only: 1 (grayscale, 'L') or 3 ('RGB', the default). For the
            torchvision datasets it may be given but must equal their native channel count.
        folder: imagefolder only: the folder of images (config ``path`` of the dataset).
        local_dirs: folders that may hold a local copy of the raw files (``data.local_dirs``).
        allow_download: try torchvision's download (``data.allow_download``).
        allow_apt: for FashionMNIST, allow ``apt-get install dataset-fashion-mnist`` as root.
        prefer_local: look in ``local_dirs`` before trying to download.

    Returns:
        The string metadata stored in the file (dataset, class_names as JSON, source, hashes).
    """
    name = _canonical_name(dataset)
    if name == "imagefolder":
        if folder is None:
            raise ValueError("dataset 'imagefolder' needs folder= (the dataset's `path` in config)")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3 for imagefolder, got {channels!r}")
        images, labels, names = _read_image_folder(Path(folder), channels or 3)
        source, raw_files = f"local:{Path(folder)}", {}
    else:
        _check_native_channels(name, channels)
        location, source = _obtain_raw_files(
            name,
            Path(raw_root),
            _as_dir_list(local_dirs),
            allow_download=allow_download,
            allow_apt=allow_apt,
            prefer_local=prefer_local,
        )
        if name == "CIFAR10":
            images, labels, names, raw_files = _read_cifar10(location)
        else:
            images, labels, names, raw_files = _read_idx_dataset(IDX_SPECS[name], location)

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "class_names": json.dumps(names),
        "num_images": str(images.shape[0]),
        "channels": str(images.shape[1]),
        "image_size": str(IMAGE_SIZE),
        "source": source,
        "raw_files": json.dumps(raw_files, sort_keys=True),
        "images_sha256": _sha256_of_array(images),
        "labels_sha256": _sha256_of_array(labels),
    }
    tensors = {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}
    write_safetensors(Path(out_path), tensors, metadata, fsync=True)  # rebuilding it is slow
    logger.info("prepared %s: %d images from %s -> %s", name, len(labels), source, out_path)
    return metadata


def load_prepared(
    path: str | os.PathLike,
    cls: int | None = None,
    max_per_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a prepared file after checking its hashes: ``(images uint8 [N,C,32,32], labels)``.

    ``cls`` keeps only that class; ``max_per_class`` keeps the first images (dataset order) of
    each kept class, so subsets are deterministic.
    """
    path = Path(path)
    images, labels, metadata = _read_verified(path)
    names = json.loads(metadata["class_names"])
    indices = _selected_indices(labels, names, cls, max_per_class, path)
    if indices is None:
        return images, labels
    return images[indices], labels[indices]


def pinned_raw_files(dataset: str) -> dict[str, str]:
    """The hashes a torchvision dataset's raw files must match before they are read (file: hash):
    the recorded sha256 of the decompressed FashionMNIST files, torchvision's md5s otherwise."""
    name = _canonical_name(dataset)
    if name == "CIFAR10":
        return {file: f"md5:{md5}" for file, md5 in sorted(_cifar10_md5s().items())}
    if name in RECORDED_SHA256:
        return {file: f"sha256:{h}" for file, h in sorted(RECORDED_SHA256[name].items())}
    spec = IDX_SPECS[name]
    return {
        archive: f"md5:{md5}"
        for url, md5 in getattr(_torchvision().datasets, name).resources
        if (archive := os.path.basename(url)).startswith((spec.images_file, spec.labels_file))
    }


def class_names(path: str | os.PathLike) -> list[str]:
    """Class names of a prepared file; class id i is ``class_names(path)[i]``."""
    return json.loads(_read_metadata(Path(path))["class_names"])


# ----------------------------------------------------------------------------- names, options


def _canonical_name(dataset: str) -> str:
    by_lower = {name.lower(): name for name in DATASETS}
    name = by_lower.get(str(dataset).lower())
    if name is None:
        hint = (
            " (CelebA: use 'imagefolder' on its image folder)" if "celeb" in dataset.lower() else ""
        )
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}{hint}")
    return name


def _native_channels(name: str) -> int:
    return 3 if name == "CIFAR10" else 1


def _check_native_channels(name: str, channels: int | None) -> None:
    if channels is not None and channels != _native_channels(name):
        raise ValueError(
            f"{name} images have {_native_channels(name)} channel(s); channels={channels} is only "
            "supported for 'imagefolder'"
        )


def _as_dir_list(local_dirs: Sequence[str | os.PathLike] | str | os.PathLike | None) -> list[Path]:
    # A single path from a config file must not be iterated character by character.
    if local_dirs is None:
        return []
    if isinstance(local_dirs, (str, os.PathLike)):
        return [Path(local_dirs)]
    return [Path(d) for d in local_dirs]


def _normalized(name: str) -> str:
    """'fashion-mnist', 'Fashion_MNIST', 'FashionMNIST' -> 'fashionmnist'."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


# ----------------------------------------------------------------------------- obtaining raw files


def _raw_dir(name: str, raw_root: Path) -> Path:
    """Where torchvision keeps (and downloads) the raw files of ``name`` under ``raw_root``."""
    return raw_root if name == "CIFAR10" else raw_root / name / "raw"


def _obtain_raw_files(
    name: str,
    raw_root: Path,
    local_dirs: list[Path],
    *,
    allow_download: bool,
    allow_apt: bool,
    prefer_local: bool,
) -> tuple[Path, str]:
    """Return (directory to read from, source label) or raise DatasetUnavailable."""
    cached = _complete_location(name, _raw_dir(name, raw_root))
    if cached is not None:
        return cached, f"local:{cached}"

    attempts: list[str] = []

    def from_download() -> tuple[Path, str] | None:
        if not allow_download:
            attempts.append("download: disabled (allow_download=False, config data.allow_download)")
            return None
        failure = _try_torchvision_download(name, raw_root)
        location = _complete_location(name, _raw_dir(name, raw_root)) if failure is None else None
        if location is None:
            attempts.append(f"download into {_raw_dir(name, raw_root)}: {failure or 'no files'}")
            return None
        return location, "download"

    def from_local_dirs() -> tuple[Path, str] | None:
        for local_dir in local_dirs:
            location = _find_in_local_dir(name, local_dir, raw_root)
            if location is not None:
                return location, f"local:{local_dir}"
        attempts.append(f"local copies: none in {[str(d) for d in local_dirs]}")
        return None

    steps = (from_local_dirs, from_download) if prefer_local else (from_download, from_local_dirs)
    for step in steps:
        found = step()
        if found is not None:
            return found

    if name == "FashionMNIST":
        failure = _try_apt_install(allow_apt)
        location = _complete_location(name, APT_FASHION_MNIST_DIR) if failure is None else None
        if location is not None:
            return location, "apt"
        attempts.append(f"apt: {failure or f'{APT_FASHION_MNIST_DIR} has no training files'}")

    raise DatasetUnavailable(_unavailable_message(name, raw_root, attempts))


def _complete_location(name: str, directory: Path) -> Path | None:
    """``directory`` if it holds every raw file ``name`` needs (existence only, verified later).

    For CIFAR10 the location is the torchvision root that contains ``cifar-10-batches-py``.
    """
    if name == "CIFAR10":
        batches = directory / _torchvision().datasets.CIFAR10.base_folder
        present = all((batches / filename).is_file() for filename in _cifar10_md5s())
        return directory if present else None
    spec = IDX_SPECS[name]
    present = all(
        (directory / f"{file}.gz").is_file() or (directory / file).is_file()
        for file in (spec.images_file, spec.labels_file)
    )
    return directory if present else None


def _find_in_local_dir(name: str, local_dir: Path, raw_root: Path) -> Path | None:
    """Look for a copy of ``name`` in ``local_dir``.

    Loose IDX files are only taken from a folder NAMED like the dataset ('fashion-mnist',
    'FashionMNIST', 'mnist', ...) or its 'raw' subfolder: MNIST and FashionMNIST use identical
    file names, so a folder of unknown content could silently supply the wrong dataset.
    """
    if not local_dir.is_dir():
        return None
    if name == "CIFAR10":
        return _find_cifar10_in_local_dir(local_dir, raw_root)
    for candidate in _dirs_named_like(name, local_dir):
        for directory in (candidate, candidate / "raw"):
            if _complete_location(name, directory) is not None:
                return directory
    return None


def _dirs_named_like(name: str, local_dir: Path) -> list[Path]:
    wanted = _normalized(name)
    matches = [local_dir] if _normalized(local_dir.name) == wanted else []
    children = sorted(p for p in local_dir.iterdir() if p.is_dir())
    return matches + [child for child in children if _normalized(child.name) == wanted]


def _find_cifar10_in_local_dir(local_dir: Path, raw_root: Path) -> Path | None:
    """A CIFAR10 root (holding cifar-10-batches-py) found in or extracted from ``local_dir``."""
    cifar = _torchvision().datasets.CIFAR10
    roots = [local_dir.parent] if local_dir.name == cifar.base_folder else []
    roots += _dirs_named_like("CIFAR10", local_dir)
    if local_dir not in roots:
        roots.append(local_dir)
    for root in roots:
        if _complete_location("CIFAR10", root) is not None:
            return root
    for root in roots:
        archive = root / cifar.filename
        if archive.is_file():
            # The archive is checked before extraction so that nothing unverified is unpacked.
            _require_md5(archive, cifar.tgz_md5, "torchvision's record of the CIFAR10 archive")
            raw_root.mkdir(parents=True, exist_ok=True)
            _torchvision().datasets.utils.extract_archive(str(archive), str(raw_root))
            return raw_root
    return None


def _try_torchvision_download(name: str, raw_root: Path) -> str | None:
    """Run torchvision's own download; return why it failed, or None on success."""
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        dataset_class = getattr(_torchvision().datasets, name)
        dataset_class(root=str(raw_root), train=True, download=True)
    except Exception as err:  # no network, proxy, HTTP errors, md5 mismatch: all mean "not here"
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        logger.info("torchvision download of %s failed: %s", name, reason)
        return reason
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return None


def _try_apt_install(allow_apt: bool) -> str | None:
    """Install Debian's FashionMNIST package; return why it did not happen, or None."""
    if not allow_apt:
        return "disabled (allow_apt=False, config data.allow_apt)"
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        return "apt-get not found"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root"
    install = [apt_get, "install", "-y", APT_FASHION_MNIST_PACKAGE]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logger.warning("running %s", " ".join(install))
    result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        # A fresh machine often has no package lists yet.
        logger.warning("apt-get install failed; running apt-get update and retrying")
        subprocess.run([apt_get, "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join(result.stderr.strip().splitlines()[-2:])
        return f"'{' '.join(install)}' failed (exit {result.returncode}): {tail}"
    return None


def _unavailable_message(name: str, raw_root: Path, attempts: list[str]) -> str:
    raw_dir = _raw_dir(name, raw_root)
    lines = [f"Could not obtain the {name} training files.", "Tried:"]
    lines += [f"  - {attempt}" for attempt in attempts]
    lines.append("To fix, do one of:")
    lines.append(
        f"  - allow network access (data.allow_download: true); torchvision saves to {raw_dir}"
    )
    if name == "FashionMNIST":
        lines.append(
            f"  - run `apt-get install {APT_FASHION_MNIST_PACKAGE}` (Debian/Ubuntu, as root): it "
            f"installs {APT_FASHION_MNIST_DIR}, which is in the default data.local_dirs"
        )
    if name == "CIFAR10":
        cifar = _torchvision().datasets.CIFAR10
        lines.append(
            f"  - put {cifar.filename} (md5 {cifar.tgz_md5}) or its extracted folder "
            f"{cifar.base_folder}/ into {raw_dir}"
        )
        lines.append("  - or list a folder holding either of them in config key data.local_dirs")
    else:
        spec = IDX_SPECS[name]
        lines.append(
            f"  - put the files {spec.images_file}.gz and {spec.labels_file}.gz (or decompressed) "
            f"into {raw_dir}"
        )
        lines.append(
            "  - or list a folder holding them in config key data.local_dirs; the files must be "
            f"in a folder named like the dataset (e.g. '{_example_folder_name(name)}') or in "
            f"its {name}/raw subfolder"
        )
    return "\n".join(lines)


def _example_folder_name(name: str) -> str:
    return {"FashionMNIST": "fashion-mnist", "MNIST": "mnist"}.get(name, name)


# ----------------------------------------------------------------------------- verification


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_md5(path: Path, expected: str, what: str) -> None:
    actual = _md5_of_file(path)
    if actual != expected:
        raise DatasetCorrupt(
            f"{path}: md5 {actual} does not match {what} ({expected}); the file is truncated, "
            "corrupted or a different version. Replace it (this file was left in place)."
        )


def _read_raw_bytes(path: Path) -> bytes:
    """The content of a raw file, decompressed when it is a .gz."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DatasetCorrupt(
            f"{path}: cannot decompress ({type(err).__name__}: {err}); the file is truncated or "
            "corrupted. Replace it (this file was left in place)."
        ) from err


def _torchvision_md5(name: str, archive_name: str) -> str | None:
    """torchvision's md5 of an original MNIST-like .gz archive, if it lists one."""
    resources = getattr(_torchvision().datasets, name).resources
    return {os.path.basename(url): md5 for url, md5 in resources}.get(archive_name)


def _verify_idx_content(name: str, file: str, path: Path, content: bytes) -> tuple[str, str]:
    """Return (sha256 of the content, how it was verified) or raise DatasetCorrupt.

    "structure" means no hash could vouch for the file; the caller still checks its structure.
    """
    actual = hashlib.sha256(content).hexdigest()
    expected = RECORDED_SHA256.get(name, {}).get(file)
    if expected is not None:
        if actual != expected:
            raise DatasetCorrupt(
                f"{path}: decompressed sha256 {actual} does not match the recorded {name} {file} "
                f"sha256 {expected}; the file is truncated, corrupted or not {name}. Replace it "
                "(this file was left in place)."
            )
        return actual, "sha256 (recorded)"
    for other, recorded in RECORDED_SHA256.items():
        if recorded.get(file) == actual:
            raise DatasetCorrupt(f"{path} is the {other} file {file}, not {name}")
    if path.suffix == ".gz":
        expected_md5 = _torchvision_md5(name, path.name)
        if expected_md5 is not None and _md5_of_file(path) == expected_md5:
            return actual, "md5 of the .gz (torchvision)"
    return actual, "structure"


def _parse_idx(content: bytes, path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes, checking its magic number and its length."""
    found_magic = int.from_bytes(content[:4], "big") if len(content) >= 4 else None
    if found_magic != magic:
        raise DatasetCorrupt(f"{path}: IDX magic number {found_magic}, expected {magic}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise DatasetCorrupt(f"{path}: truncated IDX header ({len(content)} bytes)")
    dims = struct.unpack(f">{ndim}I", content[4:header_size])
    expected_size = header_size + int(np.prod(dims))
    if len(content) != expected_size:
        raise DatasetCorrupt(
            f"{path}: {len(content)} bytes of content, the IDX header {dims} implies "
            f"{expected_size}; the file is truncated or corrupted"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(dims)


def _check_idx_structure(
    spec: IdxSpec, images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path
) -> None:
    expected_images = (spec.num_images, *spec.image_shape)
    if images.shape != expected_images:
        raise DatasetCorrupt(
            f"{images_path}: images of shape {images.shape}, expected {expected_images} for the "
            f"{spec.name} training set"
        )
    if labels.shape != (spec.num_images,):
        raise DatasetCorrupt(
            f"{labels_path}: {labels.shape[0]} labels, expected {spec.num_images} for the "
            f"{spec.name} training set"
        )
    if labels.max(initial=0) >= spec.num_classes:
        raise DatasetCorrupt(
            f"{labels_path}: label {labels.max()} is outside 0..{spec.num_classes - 1}"
        )


def _cifar10_md5s() -> dict[str, str]:
    """Every file torchvision checks before it unpickles a CIFAR10 batch, with its md5."""
    cifar = _torchvision().datasets.CIFAR10
    files = {filename: md5 for filename, md5 in cifar.train_list + cifar.test_list}
    files[cifar.meta["filename"]] = cifar.meta["md5"]
    return files


# ----------------------------------------------------------------------------- reading datasets


def _read_idx_dataset(
    spec: IdxSpec, directory: Path
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, dict[str, str]]]:
    arrays, paths, raw_files = {}, {}, {}
    for file, magic in ((spec.images_file, IDX_IMAGES_MAGIC), (spec.labels_file, IDX_LABELS_MAGIC)):
        gz_path = directory / f"{file}.gz"
        path = gz_path if gz_path.is_file() else directory / file
        content = _read_raw_bytes(path)
        sha256, verified_by = _verify_idx_content(spec.name, file, path, content)
        arrays[file], paths[file] = _parse_idx(content, path, magic), path
        raw_files[file] = {"path": str(path), "sha256": sha256, "verified_by": verified_by}
    images, labels = arrays[spec.images_file], arrays[spec.labels_file]
    _check_idx_structure(spec, images, labels, paths[spec.images_file], paths[spec.labels_file])
    for record in raw_files.values():
        if record["verified_by"] == "structure":
            logger.warning(
                "%s: content sha256 %s of this %s file is not recorded in els/data.py and no "
                "torchvision md5 matched; only its structure was checked",
                record["path"],
                record["sha256"],
                spec.name,
            )
    pil_images = (Image.fromarray(image) for image in images)
    resized = _resize_all(pil_images, len(images), channels=1, desc=f"resizing {spec.name}")
    names = list(getattr(_torchvision().datasets, spec.name).classes)
    return resized, labels.astype(np.int64), names, raw_files


def _read_cifar10(
    root: Path,
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, dict[str, str]]]:
    cifar = _torchvision().datasets.CIFAR10
    batches = root / cifar.base_folder
    raw_files = {}
    for filename, md5 in _cifar10_md5s().items():
        # Checked here (before torchvision, which would only say "not found or corrupted") so
        # the error names the file; torchvision re-checks before it unpickles anything.
        _require_md5(batches / filename, md5, "torchvision's CIFAR10 record")
        raw_files[filename] = {"path": str(batches / filename), "md5": md5, "verified_by": "md5"}
    dataset = cifar(root=str(root), train=True, download=False)
    pil_images = (Image.fromarray(image) for image in dataset.data)
    resized = _resize_all(pil_images, len(dataset.data), channels=3, desc="resizing CIFAR10")
    return resized, np.asarray(dataset.targets, dtype=np.int64), list(dataset.classes), raw_files


def _read_image_folder(folder: Path, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read an image folder (class subfolders, or flat = one class). CelebA is read this way."""
    files, labels, names = list_image_folder(folder)
    _require_one_size(files, folder)
    mode = "L" if channels == 1 else "RGB"
    pil_images = (_open_converted(path, mode) for path in files)
    resized = _resize_all(pil_images, len(files), channels, desc=f"resizing {folder.name}")
    return resized, np.asarray(labels, dtype=np.int64), names


def list_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image files, class ids, class names) of an image folder, in the order they are read:
    one sorted subfolder per class, or a flat folder (one class named after the folder)."""
    if not folder.is_dir():
        raise DatasetUnavailable(f"image folder {folder} does not exist (check the dataset path)")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_level_images = _image_files_in(folder, recursive=False)
    if subfolders and top_level_images:
        raise DatasetError(
            f"{folder} holds both images (e.g. {top_level_images[0].name}) and subfolders (e.g. "
            f"{subfolders[0].name}); use either one subfolder per class or a flat folder of images"
        )
    if not subfolders:
        if not top_level_images:
            raise DatasetUnavailable(
                f"no images found in {folder} (looked for {', '.join(IMG_EXTENSIONS)})"
            )
        return top_level_images, [0] * len(top_level_images), [folder.name]
    files: list[Path] = []
    labels: list[int] = []
    for class_id, subfolder in enumerate(subfolders):
        class_files = _image_files_in(subfolder, recursive=True)
        if not class_files:
            extensions = ", ".join(IMG_EXTENSIONS)
            raise DatasetUnavailable(
                f"class subfolder {subfolder} has no images (looked for {extensions})"
            )
        files += class_files
        labels += [class_id] * len(class_files)
    return files, labels, [subfolder.name for subfolder in subfolders]


def _image_files_in(directory: Path, *, recursive: bool) -> list[Path]:
    candidates = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        path
        for path in candidates
        if path.is_file()
        and path.name.lower().endswith(IMG_EXTENSIONS)
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def _require_one_size(files: list[Path], folder: Path) -> None:
    """All images must share one size: a plain resize of mixed sizes would distort some."""
    first_path, first_size = None, None
    # Opening reads only the header, so a bad folder fails before any pixel is decoded.
    for path in tqdm(files, desc=f"checking {folder.name}", mininterval=1.0):
        try:
            with Image.open(path) as image:
                size = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetCorrupt(f"cannot read image {path}: {err}") from err
        if first_size is None:
            first_path, first_size = path, size
        elif size != first_size:
            raise DatasetError(
                f"images in {folder} differ in size: {first_path} is {first_size[0]}x"
                f"{first_size[1]} but {path} is {size[0]}x{size[1]}; crop/resize them to one "
                "size first"
            )


def _open_converted(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # decodes the pixels, so truncation shows up here
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetCorrupt(f"cannot read image {path}: {err}") from err


def _resize_all(images: Iterable[Image.Image], count: int, channels: int, desc: str) -> np.ndarray:
    """Resize PIL images to 32x32 exactly like torchvision Resize((32, 32)); uint8 [N,C,32,32]."""
    resize = _torchvision().transforms.Resize((IMAGE_SIZE, IMAGE_SIZE))
    out = np.empty((count, channels, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    filled = 0
    for index, image in enumerate(tqdm(images, total=count, desc=desc, mininterval=1.0)):
        array = np.asarray(resize(image))
        out[index] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        filled = index + 1
    if filled != count:
        raise DatasetCorrupt(f"expected {count} images for {desc!r}, read {filled}")
    return out


# ----------------------------------------------------------------------------- prepared file


def _sha256_of_array(array: np.ndarray | torch.Tensor) -> str:
    """sha256 of the raw bytes alone (the file records dtype and shape separately)."""
    return content_sha256(array, describe=False)


def _not_prepared(path: Path, why: str) -> DatasetCorrupt:
    return DatasetCorrupt(
        f"{path} is not a valid prepared dataset ({why}); delete it and run prepare_dataset again"
    )


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset {path} does not exist (run prepare_dataset)")
    try:
        with safe_open(str(path), framework="pt") as stream:
            metadata = stream.metadata() or {}
    except Exception as err:  # safetensors raises several types for a damaged header
        raise _not_prepared(path, f"{type(err).__name__}: {err}") from err
    if metadata.get("format") != FORMAT:
        raise _not_prepared(path, f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _not_prepared(path, f"format_version {metadata.get('format_version')!r}")
    return metadata


def _read_verified(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    metadata = _read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as stream:
            images, labels = stream.get_tensor("images"), stream.get_tensor("labels")
    except Exception as err:
        raise _not_prepared(path, f"{type(err).__name__}: {err}") from err
    for key, tensor in (("images", images), ("labels", labels)):
        actual, expected = _sha256_of_array(tensor), metadata.get(f"{key}_sha256")
        if actual != expected:
            raise DatasetCorrupt(
                f"{path}: sha256 of '{key}' is {actual}, the file records {expected}; the file "
                "is corrupt. Delete it and run prepare_dataset again."
            )
    if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        raise _not_prepared(
            path, f"images {images.dtype} {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    return images, labels, metadata


def _selected_indices(
    labels: torch.Tensor,
    names: list[str],
    cls: int | None,
    max_per_class: int | None,
    path: Path,
) -> torch.Tensor | None:
    """Indices to keep (dataset order), or None to keep everything."""
    if max_per_class is not None and operator.index(max_per_class) < 1:
        raise ValueError(f"max_per_class must be at least 1, got {max_per_class}")
    if cls is None:
        if max_per_class is None:
            return None
        kept = [(labels == c).nonzero().squeeze(1)[:max_per_class] for c in range(len(names))]
        return torch.cat(kept).sort().values
    cls = operator.index(cls)
    if not 0 <= cls < len(names):
        raise ValueError(
            f"class {cls} is out of range for {path}: valid classes are 0..{len(names) - 1} "
            f"({', '.join(f'{i}={n}' for i, n in enumerate(names))})"
        )
    indices = (labels == cls).nonzero().squeeze(1)
    if len(indices) == 0:
        raise ValueError(f"class {cls} ({names[cls]}) has no images in {path}")
    return indices if max_per_class is None else indices[:max_per_class]
