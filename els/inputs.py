"""What a prepared dataset depends on, as a manifest of content hashes, and the start-up checks of the
data it names.

A manifest is computed when the workflow starts: for an image folder, every image file (path inside
the folder, sha256 of its bytes) plus the channels; for a torchvision dataset, the hashes that pin
its raw files (els.data refuses any other content, so the pin is what determines the result). Its key
(a sha256 of the manifest) names the folder the prepared data are written to,
``results/data/<dataset>/inputs/<key>/``, and the manifest itself is stored there as ``inputs.json``,
written once and never rewritten. So:

- adding, removing or changing an image changes the key: prepare_data runs for the new key, and
  select_data copies its result to results/data/<dataset>/train.safetensors, which reruns what
  depends on it; touching a file without changing it changes nothing;
- a prepare_data job that fails leaves the data of every other key (and the selected copy) in
  place, so going back to the previous files or config runs nothing.

File hashes are cached by (size, mtime) in .snakemake/els/ so an unchanged folder is not reread.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from .io import file_sha256, read_json, write_json

INPUTS_DIR = "results/data/{dataset}/inputs"
CACHE_DIR = Path(".snakemake") / "els"
KEEP_PREPARED = 3  # prepared versions kept per dataset: the selected one and the two before it


class DataInputError(ValueError):
    """The data a config names cannot be used; the message names the config key."""


def image_folder_listing(folder: Path, where: str):
    """(files, labels, class names) of an image folder as els.data reads it, or DataInputError."""
    from .data import DatasetError, list_image_folder

    try:
        return list_image_folder(folder)
    except DatasetError as err:
        raise DataInputError(f"{where}.path: {err}") from None


def manifest(name: str, ds: Mapping, root: Path = Path(".")) -> dict:
    """The content-hash manifest of dataset `name` (its config entry `ds`; {} for a torchvision set
    that only the CNN uses)."""
    where = f"datasets.{name}"
    if ds.get("source", "torchvision") == "imagefolder":
        folder = Path(ds["path"])
        files, labels, names = image_folder_listing(root / folder, where)
        hashes = _cached_hashes(name, root / folder, files, root)
        return {
            "source": "imagefolder",
            "channels": ds.get("channels"),
            "class_names": names,
            "files": [
                [str(f.relative_to(root / folder)), hashes[str(f)], label]
                for f, label in zip(files, labels, strict=True)
            ],
        }
    from .data import pinned_raw_files

    return {"source": "torchvision", "dataset": name, "raw_files": pinned_raw_files(name)}


def key_of(content: Mapping) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record(name: str, content: Mapping, root: Path = Path(".")) -> str:
    """Store the manifest under its key (once) and return the key."""
    key = key_of(content)
    path = root / INPUTS_DIR.format(dataset=name) / key / "inputs.json"
    if not path.is_file():
        write_json(path, content)
    return key


def class_count(content: Mapping) -> int | None:
    """How many classes the manifest's data have (None: a torchvision set, checked by its name)."""
    names = content.get("class_names")
    return len(names) if names is not None else None


def _cached_hashes(name: str, folder: Path, files: list[Path], root: Path) -> dict[str, str]:
    cache_path = root / CACHE_DIR / f"{name}-hashes.json"
    try:
        cache = read_json(cache_path)
    except (OSError, ValueError):
        cache = {}
    hashes, fresh = {}, {}
    for path in files:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = cache.get(str(path))
        if entry and entry[:2] == stamp:
            digest = entry[2]
        else:
            digest = file_sha256(path)
        hashes[str(path)] = digest
        fresh[str(path)] = [*stamp, digest]
    if fresh != cache:
        write_json(cache_path, fresh)
    return hashes


def select(prepared: Path, prepared_meta: Path, train: Path, meta: Path) -> None:
    """Copy the prepared version to the paths the later stages read, then drop old versions beyond
    KEEP_PREPARED (never the one just selected)."""
    from .io import atomic_path

    prepared, prepared_meta, train, meta = map(Path, (prepared, prepared_meta, train, meta))
    for source, target in ((prepared, train), (prepared_meta, meta)):
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    versions = sorted(
        (p for p in prepared.parent.parent.iterdir() if (p / "train.safetensors").is_file()),
        key=lambda p: (p / "train.safetensors").stat().st_mtime_ns,
        reverse=True,
    )
    for old in versions[KEEP_PREPARED:]:
        if old != prepared.parent:
            shutil.rmtree(old, ignore_errors=True)
