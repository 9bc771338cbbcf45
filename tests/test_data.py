"""Tests of els.data on tiny datasets written in the real raw formats (no network)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import pickle
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from PIL import Image

from els import data
from els.data import (
    DatasetCorrupt,
    DatasetError,
    DatasetUnavailable,
    class_names,
    load_prepared,
    prepare_dataset,
)

IMAGES_FILE = "train-images-idx3-ubyte"
LABELS_FILE = "train-labels-idx1-ubyte"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any torchvision download attempt fails at once, as on a machine without network."""

    def refuse(self: object) -> None:
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", refuse)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)


@pytest.fixture
def small_idx(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """Six 28x28 images of two classes; the IDX specs are shrunk to match them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([1, 0, 1, 1, 0, 1], dtype=np.uint8)
    for name in ("MNIST", "FashionMNIST"):
        small = dataclasses.replace(data.IDX_SPECS[name], num_images=len(labels))
        monkeypatch.setitem(data.IDX_SPECS, name, small)
    return images, labels


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx_files(
    directory: Path, images: np.ndarray, labels: np.ndarray, *, compressed: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for file, content in (
        (IMAGES_FILE, idx_bytes(images, data.IDX_IMAGES_MAGIC)),
        (LABELS_FILE, idx_bytes(labels, data.IDX_LABELS_MAGIC)),
    ):
        if compressed:
            (directory / f"{file}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / file).write_bytes(content)
    return directory


def record_fake_fashion_hashes(monkeypatch: pytest.MonkeyPatch, images, labels) -> None:
    fake = {
        IMAGES_FILE: hashlib.sha256(idx_bytes(images, data.IDX_IMAGES_MAGIC)).hexdigest(),
        LABELS_FILE: hashlib.sha256(idx_bytes(labels, data.IDX_LABELS_MAGIC)).hexdigest(),
    }
    monkeypatch.setitem(data.RECORDED_SHA256, "FashionMNIST", fake)


def prepare(dataset: str, tmp_path: Path, **options) -> tuple[dict[str, str], Path]:
    """prepare_dataset with offline defaults: no download, no apt, no default local dirs."""
    options = {"local_dirs": (), "allow_download": False, "allow_apt": False, **options}
    out = tmp_path / "prepared" / f"{dataset}.safetensors"
    return prepare_dataset(dataset, tmp_path / "raw", out, **options), out


def torchvision_resized(image: Image.Image) -> np.ndarray:
    array = np.asarray(torchvision.transforms.Resize((32, 32))(image))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def write_png(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


# ----------------------------------------------------------------------------- resize


def test_resize_equals_torchvision_resize_pixel_for_pixel() -> None:
    rng = np.random.default_rng(1)
    gray = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(5)]
    rgb = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(3)]
    for images, channels in ((gray, 1), (rgb, 3)):
        resized = data._resize_all(iter(images), len(images), channels, desc="test")
        assert resized.dtype == np.uint8 and resized.shape == (len(images), channels, 32, 32)
        for ours, image in zip(resized, images, strict=True):
            np.testing.assert_array_equal(ours, torchvision_resized(image))


# ----------------------------------------------------------------------------- MNIST / FashionMNIST


def test_prepare_mnist_from_local_copy(tmp_path, small_idx, caplog) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "copies" / "mnist", images, labels)
    with caplog.at_level(logging.WARNING, logger="els.data"):
        metadata, out = prepare("MNIST", tmp_path, local_dirs=[tmp_path / "copies"])

    stored, stored_labels = load_prepared(out)
    assert stored.dtype == torch.uint8 and stored.shape == (6, 1, 32, 32)
    assert stored_labels.dtype == torch.int64 and stored_labels.tolist() == labels.tolist()
    for ours, raw in zip(stored.numpy(), images, strict=True):
        np.testing.assert_array_equal(ours, torchvision_resized(Image.fromarray(raw, mode="L")))
    assert metadata["source"] == f"local:{tmp_path / 'copies'}"
    assert metadata["dataset"] == "MNIST"
    assert class_names(out) == torchvision.datasets.MNIST.classes
    raw_files = json.loads(metadata["raw_files"])
    assert raw_files[IMAGES_FILE]["path"] == str(local / f"{IMAGES_FILE}.gz")
    assert raw_files[IMAGES_FILE]["verified_by"] == "structure"
    assert "not recorded" in caplog.text


def test_mnist_archives_verified_by_torchvision_md5(tmp_path, small_idx, monkeypatch, caplog):
    images, labels = small_idx
    local = write_idx_files(tmp_path / "copies" / "MNIST" / "raw", images, labels)
    md5s = [(f.name, hashlib.md5(f.read_bytes()).hexdigest()) for f in local.iterdir()]
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", md5s)
    with caplog.at_level(logging.WARNING, logger="els.data"):
        metadata, _ = prepare("mnist", tmp_path, local_dirs=[tmp_path / "copies"])
    verified = {f: r["verified_by"] for f, r in json.loads(metadata["raw_files"]).items()}
    assert set(verified.values()) == {"md5 of the .gz (torchvision)"}
    assert "not recorded" not in caplog.text


def test_fashion_mnist_recorded_sha256_accepts_uncompressed_copy(tmp_path, small_idx, monkeypatch):
    images, labels = small_idx
    record_fake_fashion_hashes(monkeypatch, images, labels)
    write_idx_files(tmp_path / "copies" / "fashion-mnist", images, labels, compressed=False)
    metadata, out = prepare("FashionMNIST", tmp_path, local_dirs=[tmp_path / "copies"])
    verified = {r["verified_by"] for r in json.loads(metadata["raw_files"]).values()}
    assert verified == {"sha256 (recorded)"}
    assert load_prepared(out)[1].tolist() == labels.tolist()


def test_fashion_mnist_hash_mismatch_names_file_and_hashes(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "fashion-mnist", images, labels)
    with pytest.raises(DatasetCorrupt) as error:
        prepare("FashionMNIST", tmp_path, local_dirs=[local])
    message = str(error.value)
    assert str(local / f"{IMAGES_FILE}.gz") in message
    assert data.RECORDED_SHA256["FashionMNIST"][IMAGES_FILE] in message
    assert hashlib.sha256(idx_bytes(images, data.IDX_IMAGES_MAGIC)).hexdigest() in message
    assert (local / f"{IMAGES_FILE}.gz").exists(), "nothing may be deleted"


def test_truncated_idx_gz_is_corrupt_and_named(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels)
    archive = local / f"{IMAGES_FILE}.gz"
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(DatasetCorrupt, match=str(archive)):
        prepare("MNIST", tmp_path, local_dirs=[local])
    assert archive.exists()


def test_truncated_idx_content_is_corrupt(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels, compressed=False)
    raw = local / IMAGES_FILE
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(DatasetCorrupt, match="truncated"):
        prepare("MNIST", tmp_path, local_dirs=[local])


def test_unrecorded_copy_with_wrong_structure_is_corrupt(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images[:4], labels[:4])  # spec expects 6
    with pytest.raises(DatasetCorrupt, match="expected \\(6, 28, 28\\)"):
        prepare("MNIST", tmp_path, local_dirs=[local])


def test_fashion_mnist_files_are_not_taken_for_mnist(tmp_path, small_idx, monkeypatch) -> None:
    images, labels = small_idx
    record_fake_fashion_hashes(monkeypatch, images, labels)
    # Same file names, but in a folder not named like MNIST: it must not be used for MNIST.
    write_idx_files(tmp_path / "copies" / "fashion-mnist", images, labels)
    write_idx_files(tmp_path / "copies" / "downloads", images, labels)
    with pytest.raises(DatasetUnavailable):
        prepare("MNIST", tmp_path, local_dirs=[tmp_path / "copies" / "fashion-mnist"])
    with pytest.raises(DatasetUnavailable):
        prepare("MNIST", tmp_path, local_dirs=[tmp_path / "copies" / "downloads"])
    # And if FashionMNIST content does end up in an MNIST folder, its recorded hash betrays it.
    write_idx_files(tmp_path / "copies" / "mnist", images, labels)
    with pytest.raises(DatasetCorrupt, match="is the FashionMNIST file"):
        prepare("MNIST", tmp_path, local_dirs=[tmp_path / "copies" / "mnist"])


# ----------------------------------------------------------------------------- obtaining raw files


def test_unavailable_error_says_what_to_do(tmp_path, monkeypatch) -> None:
    attempts = []

    def refuse(self: object) -> None:
        attempts.append(type(self).__name__)
        raise RuntimeError("network disabled in tests")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"no command may run with allow_apt=False: {args}")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", refuse)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(DatasetUnavailable) as error:
        prepare("FashionMNIST", tmp_path, allow_download=True, local_dirs=[tmp_path / "nothing"])
    assert attempts == ["FashionMNIST"]  # one download attempt, no retries, then the error
    message = str(error.value)
    raw_dir = tmp_path / "raw" / "FashionMNIST" / "raw"
    for expected in (
        "network disabled in tests",  # why the download failed
        "apt-get install dataset-fashion-mnist",
        f"{IMAGES_FILE}.gz",
        f"{LABELS_FILE}.gz",
        str(raw_dir),
        "data.local_dirs",
        "allow_apt=False",
    ):
        assert expected in message


def test_unavailable_error_for_cifar10_names_archive(tmp_path) -> None:
    with pytest.raises(DatasetUnavailable) as error:
        prepare("CIFAR10", tmp_path)
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and "data.local_dirs" in message
    assert "apt-get" not in message


def test_download_failure_falls_back_to_local_copy(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels)
    metadata, _ = prepare("MNIST", tmp_path, allow_download=True, local_dirs=[local])
    assert metadata["source"] == f"local:{local}"


def test_prefer_local_skips_download(tmp_path, small_idx, monkeypatch) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels)

    def must_not_download(*args, **kwargs):
        raise AssertionError("download attempted although a local copy exists")

    monkeypatch.setattr(data, "_try_torchvision_download", must_not_download)
    metadata, _ = prepare(
        "MNIST", tmp_path, allow_download=True, local_dirs=[local], prefer_local=True
    )
    assert metadata["source"] == f"local:{local}"


def test_download_is_used_first_and_then_cached(tmp_path, small_idx, monkeypatch) -> None:
    images, labels = small_idx

    def fake_download(self: torchvision.datasets.MNIST) -> None:
        # Like torchvision: all four archives, kept next to their decompressed content.
        raw_folder = Path(self.raw_folder)
        write_idx_files(raw_folder, images, labels)
        write_idx_files(raw_folder, images, labels, compressed=False)
        for path in list(raw_folder.iterdir()):
            (raw_folder / path.name.replace("train", "t10k")).write_bytes(path.read_bytes())

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fake_download)
    metadata, _ = prepare("MNIST", tmp_path, allow_download=True)
    assert metadata["source"] == "download"
    # The files now in the raw root are used without another download attempt.
    monkeypatch.setattr(data, "_try_torchvision_download", None)
    metadata, _ = prepare("MNIST", tmp_path, allow_download=True)
    assert metadata["source"] == f"local:{tmp_path / 'raw' / 'MNIST' / 'raw'}"


def test_apt_install_is_last_resort_and_retries_after_update(tmp_path, small_idx, monkeypatch):
    images, labels = small_idx
    record_fake_fashion_hashes(monkeypatch, images, labels)
    apt_dir = tmp_path / "usr-share-datasets" / "fashion-mnist"
    monkeypatch.setattr(data, "APT_FASHION_MNIST_DIR", apt_dir)
    monkeypatch.setattr(data.shutil, "which", lambda program: f"/usr/bin/{program}")
    monkeypatch.setattr(data.os, "geteuid", lambda: 0)
    commands: list[list[str]] = []

    def fake_run(command, **kwargs):
        commands.append(command[1:])
        updated = ["update"] in commands
        if command[1] == "install" and updated:
            write_idx_files(apt_dir, images, labels)
        failed = command[1] == "install" and not updated
        return subprocess.CompletedProcess(command, 100 if failed else 0, "", "E: no lists")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    metadata, _ = prepare("FashionMNIST", tmp_path, allow_apt=True)
    assert metadata["source"] == "apt"
    install = ["install", "-y", "dataset-fashion-mnist"]
    assert commands == [install, ["update"], install]


def test_apt_is_not_tried_without_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data.shutil, "which", lambda program: f"/usr/bin/{program}")
    monkeypatch.setattr(data.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(data.subprocess, "run", None)  # calling it would fail the test
    with pytest.raises(DatasetUnavailable, match="not running as root"):
        prepare("FashionMNIST", tmp_path, allow_apt=True)


# ----------------------------------------------------------------------------- CIFAR10


def write_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int]]:
    """A tiny cifar-10-batches-py folder in torchvision's pickle format (test data only)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    all_rows, all_labels = [], []
    for filename in (*CIFAR_FILES, "test_batch"):
        rows = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        batch_labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        batch = {"data": rows, "labels": batch_labels}
        (folder / filename).write_bytes(pickle.dumps(batch))
        if filename != "test_batch":
            all_rows.append(rows)
            all_labels += batch_labels
    names = [f"class{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return np.concatenate(all_rows).reshape(-1, 3, 32, 32), all_labels


def record_fake_cifar10_md5s(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    def md5(name: str) -> str:
        return hashlib.md5((root / "cifar-10-batches-py" / name).read_bytes()).hexdigest()

    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, md5(name)] for name in CIFAR_FILES])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5("batches.meta")})


def test_cifar10_md5_mismatch_is_corrupt_before_unpickling(tmp_path, monkeypatch) -> None:
    write_cifar10(tmp_path / "cifar10")
    monkeypatch.setattr(pickle, "load", None)  # unpickling would fail this test
    with pytest.raises(DatasetCorrupt) as error:
        prepare("CIFAR10", tmp_path, local_dirs=[tmp_path / "cifar10"])
    first = torchvision.datasets.CIFAR10.train_list[0]
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py" / first[0]) in str(error.value)
    assert first[1] in str(error.value)


def test_cifar10_from_local_folder(tmp_path, monkeypatch) -> None:
    raw, raw_labels = write_cifar10(tmp_path / "copies")
    record_fake_cifar10_md5s(monkeypatch, tmp_path / "copies")
    metadata, out = prepare("CIFAR10", tmp_path, local_dirs=[tmp_path / "copies"])
    images, labels = load_prepared(out)
    assert images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(images.numpy(), raw)  # already 32x32: unchanged
    assert labels.tolist() == raw_labels
    assert class_names(out) == [f"class{i}" for i in range(10)]
    assert metadata["source"] == f"local:{tmp_path / 'copies'}"


def test_cifar10_archive_in_local_dir_is_checked_then_extracted(tmp_path, monkeypatch) -> None:
    write_cifar10(tmp_path / "build")
    record_fake_cifar10_md5s(monkeypatch, tmp_path / "build")
    archive = tmp_path / "copies" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DatasetCorrupt, match="cifar-10-python.tar.gz"):
        prepare("CIFAR10", tmp_path, local_dirs=[archive.parent])
    assert not (tmp_path / "raw" / "cifar-10-batches-py").exists()
    archive_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", archive_md5)
    _, out = prepare("CIFAR10", tmp_path, local_dirs=[archive.parent])
    assert load_prepared(out)[0].shape == (15, 3, 32, 32)


# ----------------------------------------------------------------------------- image folders


def test_image_folder_with_classes(tmp_path) -> None:
    folder = tmp_path / "faces"
    b = [write_png(folder / "b" / f"{i}.png", (40, 30), seed=i) for i in range(2)]
    a = [write_png(folder / "a" / "nested" / f"{i}.png", (40, 30), seed=10 + i) for i in range(3)]
    (folder / "a" / "notes.txt").write_text("ignored")
    _, out = prepare("imagefolder", tmp_path, folder=folder, channels=3)
    images, labels = load_prepared(out)
    assert class_names(out) == ["a", "b"]
    assert labels.tolist() == [0, 0, 0, 1, 1]
    for ours, array in zip(images.numpy(), a + b, strict=True):
        np.testing.assert_array_equal(ours, torchvision_resized(Image.fromarray(array)))


def test_flat_image_folder_is_one_class_and_converts_to_gray(tmp_path) -> None:
    folder = tmp_path / "celeba"
    arrays = [write_png(folder / f"{i:06d}.png", (33, 33), seed=i) for i in range(3)]
    metadata, out = prepare("imagefolder", tmp_path, folder=folder, channels=1)
    images, labels = load_prepared(out)
    assert images.shape == (3, 1, 32, 32) and labels.tolist() == [0, 0, 0]
    assert class_names(out) == ["celeba"] and metadata["source"] == f"local:{folder}"
    for ours, array in zip(images.numpy(), arrays, strict=True):
        gray = Image.fromarray(array).convert("L")
        np.testing.assert_array_equal(ours, torchvision_resized(gray))


def test_image_folder_mixed_sizes_names_two_files(tmp_path) -> None:
    write_png(tmp_path / "imgs" / "a.png", (32, 32), seed=0)
    write_png(tmp_path / "imgs" / "b.png", (28, 30), seed=1)
    with pytest.raises(DatasetError) as error:
        prepare("imagefolder", tmp_path, folder=tmp_path / "imgs")
    message = str(error.value)
    assert "a.png is 32x32" in message and "b.png is 28x30" in message


def test_image_folder_unreadable_file_is_named(tmp_path) -> None:
    write_png(tmp_path / "imgs" / "good.png", (32, 32), seed=0)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetCorrupt, match="bad.png"):
        prepare("imagefolder", tmp_path, folder=tmp_path / "imgs")


def test_image_folder_truncated_png_is_named(tmp_path) -> None:
    write_png(tmp_path / "imgs" / "good.png", (32, 32), seed=0)
    path = tmp_path / "imgs" / "truncated.png"
    write_png(path, (32, 32), seed=1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetCorrupt, match="truncated.png"):
        prepare("imagefolder", tmp_path, folder=tmp_path / "imgs")


def test_image_folder_empty_or_missing_is_unavailable(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "empty")):
        prepare("imagefolder", tmp_path, folder=tmp_path / "empty")
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        prepare("imagefolder", tmp_path, folder=tmp_path / "missing")


def test_image_folder_class_without_images_is_named(tmp_path) -> None:
    write_png(tmp_path / "imgs" / "cat" / "0.png", (32, 32), seed=0)
    (tmp_path / "imgs" / "dog").mkdir()
    with pytest.raises(DatasetUnavailable, match=str(tmp_path / "imgs" / "dog")):
        prepare("imagefolder", tmp_path, folder=tmp_path / "imgs")


# ----------------------------------------------------------------------------- prepared file


def test_atomic_write_leaves_old_file_on_failure(tmp_path, small_idx, monkeypatch) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels)
    _, out = prepare("MNIST", tmp_path, local_dirs=[local])
    before = out.read_bytes()
    real_save = safetensors.torch.save_file

    def save_then_crash(tensors, filename, metadata=None):
        real_save({"images": tensors["images"][:1]}, filename, metadata=metadata)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare("MNIST", tmp_path, local_dirs=[local])
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_load_prepared_selects_classes(tmp_path, small_idx) -> None:
    images, labels = small_idx  # labels 1, 0, 1, 1, 0, 1
    local = write_idx_files(tmp_path / "mnist", images, labels)
    _, out = prepare("MNIST", tmp_path, local_dirs=[local])
    everything, _ = load_prepared(out)

    ones, one_labels = load_prepared(out, cls=1)
    assert one_labels.tolist() == [1, 1, 1, 1]
    assert torch.equal(ones, everything[[0, 2, 3, 5]])
    first_two, _ = load_prepared(out, cls=1, max_per_class=2)
    assert torch.equal(first_two, everything[[0, 2]])
    _, per_class = load_prepared(out, max_per_class=1)
    assert per_class.tolist() == [1, 0]  # dataset order kept
    assert torch.equal(load_prepared(out, cls=np.int64(0))[0], everything[[1, 4]])

    with pytest.raises(ValueError, match=r"class 10 is out of range .* 0\.\.9"):
        load_prepared(out, cls=10)
    with pytest.raises(ValueError, match="class -1 is out of range"):
        load_prepared(out, cls=-1)
    with pytest.raises(ValueError, match="class 5 .* has no images"):
        load_prepared(out, cls=5)
    with pytest.raises(ValueError, match="max_per_class"):
        load_prepared(out, cls=1, max_per_class=0)


def images_tensor_offset(content: bytes) -> int:
    """Byte offset of the 'images' tensor data in a safetensors file."""
    header_size = int.from_bytes(content[:8], "little")
    header = json.loads(content[8 : 8 + header_size])
    return 8 + header_size + header["images"]["data_offsets"][0]


def test_load_prepared_detects_corruption(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels)
    _, out = prepare("MNIST", tmp_path, local_dirs=[local])
    content = bytearray(out.read_bytes())

    flipped = tmp_path / "flipped.safetensors"
    flipped_content = content.copy()
    flipped_content[images_tensor_offset(content) + 7] ^= 0xFF
    flipped.write_bytes(bytes(flipped_content))
    with pytest.raises(DatasetCorrupt, match=f"{flipped}.*sha256 of 'images'"):
        load_prepared(flipped)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(content[:-50]))
    with pytest.raises(DatasetCorrupt, match=str(truncated)):
        load_prepared(truncated)

    with pytest.raises(FileNotFoundError, match="run prepare_dataset"):
        load_prepared(tmp_path / "missing.safetensors")


def test_prepared_metadata(tmp_path, small_idx) -> None:
    images, labels = small_idx
    local = write_idx_files(tmp_path / "mnist", images, labels)
    metadata, out = prepare("MNIST", tmp_path, local_dirs=[local])
    stored, stored_labels = load_prepared(out)
    assert metadata["images_sha256"] == hashlib.sha256(stored.numpy().tobytes()).hexdigest()
    assert metadata["labels_sha256"] == hashlib.sha256(stored_labels.numpy().tobytes()).hexdigest()
    assert metadata["format_version"] == data.FORMAT_VERSION
    assert metadata["num_images"] == "6" and metadata["channels"] == "1"


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="imagefolder"):
        prepare("CelebA", tmp_path)
    with pytest.raises(ValueError, match="1 channel"):
        prepare("MNIST", tmp_path, channels=3)
    with pytest.raises(ValueError, match="folder="):
        prepare("imagefolder", tmp_path)
    assert set(data.DATASETS) == {"MNIST", "FashionMNIST", "CIFAR10", "imagefolder"}


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(
    not (data.APT_FASHION_MNIST_DIR / f"{IMAGES_FILE}.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian_copy(tmp_path) -> None:
    metadata, out = prepare(
        "FashionMNIST", tmp_path, local_dirs=[data.APT_FASHION_MNIST_DIR], prefer_local=True
    )
    images, labels = load_prepared(out)
    assert images.dtype == torch.uint8 and images.shape == (60000, 1, 32, 32)
    assert labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert len(class_names(out)) == 10
    assert metadata["source"] == f"local:{data.APT_FASHION_MNIST_DIR}"
    verified = {r["verified_by"] for r in json.loads(metadata["raw_files"]).values()}
    assert verified == {"sha256 (recorded)"}
    sandal, _ = load_prepared(out, cls=5, max_per_class=100)
    assert sandal.shape == (100, 1, 32, 32)


def test_image_extensions_are_torchvisions():
    """els.data keeps its own copy so that reading a prepared file never imports torchvision."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from els import data

    assert data.IMG_EXTENSIONS == IMG_EXTENSIONS
