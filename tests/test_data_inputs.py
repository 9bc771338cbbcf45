"""Nothing stale, nothing lost: an image folder's files are inputs of prepare_data (by content hash),
whatever can be checked is checked before any job runs, and a failing rerun leaves the good results
usable, so going back to the good inputs runs nothing. On a copy of the shared tiny workflow run."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_workflow import (
    DATASET,
    reference_run,
    result_files,
    run_snakemake,
    shared_root,
    tiny_config,
    write_config,
)

from els import inputs

pytestmark = pytest.mark.slow

TRAIN = f"results/data/{DATASET}/train.safetensors"
META = f"results/data/{DATASET}/meta.json"
DOWNSTREAM = {"build_index", "sample_batch", "finish_seed"}


@pytest.fixture
def workdir(tmp_path_factory, tmp_path) -> Path:
    """A copy of the finished reference workdir (with Snakemake's records) whose config points at
    its own copy of the image folder, so the test can change images."""
    reference = reference_run(tmp_path_factory)
    work = tmp_path / "work"
    shutil.copytree(reference.workdir, work, symlinks=True)
    shutil.copytree(shared_root(tmp_path_factory) / "images", tmp_path / "images")
    write_config(work, tiny_config(tmp_path / "images"))
    return work


def planned(workdir: Path) -> dict[str, int]:
    """rule -> job count of a dry run ({} when there is nothing to do)."""
    out = run_snakemake(workdir, "-n").output
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def snapshot(workdir: Path) -> dict[str, tuple[str, int]]:
    return {
        name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for name, path in result_files(workdir).items()
    }


def gray(path: Path, value: int) -> None:
    Image.fromarray(np.full((32, 32), value, dtype=np.uint8), mode="L").save(path)


def test_the_copy_is_up_to_date_and_touching_an_image_changes_nothing(workdir, tmp_path):
    assert planned(workdir) == {}  # same content in another folder: the same input key
    (tmp_path / "images" / "c0" / "img1.png").touch()
    assert planned(workdir) == {}


@pytest.mark.parametrize("change", ["add", "change"])
def test_a_new_or_changed_image_reruns_the_data_and_what_depends_on_it(workdir, tmp_path, change):
    name = "img9.png" if change == "add" else "img2.png"
    gray(tmp_path / "images" / "c1" / name, 77)
    jobs = planned(workdir)
    assert jobs.pop("prepare_data") == 1 and jobs.pop("select_data") == 1
    assert DOWNSTREAM <= set(jobs), jobs


def test_a_failing_rerun_keeps_the_good_data_and_going_back_runs_nothing(workdir, tmp_path):
    image = tmp_path / "images" / "c0" / "img1.png"
    good = image.read_bytes()
    before = snapshot(workdir)
    image.write_bytes(b"not a png")  # hashes fine at start-up, fails when prepare_data decodes it
    run = run_snakemake(workdir, "--cores", "1", check=False)
    assert run.returncode != 0 and "Error in rule prepare_data" in run.output
    assert f"cannot read image {image}" in run.output
    assert "nothing was deleted" not in run.output
    after = snapshot(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # bytes and mtimes
    assert TRAIN in after and META in after
    image.write_bytes(good)
    assert planned(workdir) == {}


def test_a_missing_folder_or_class_fails_at_start_up_and_touches_nothing(workdir, tmp_path):
    before = snapshot(workdir)
    config = tiny_config(tmp_path / "imagez")
    write_config(workdir, config)
    run = run_snakemake(workdir, "-n", check=False)
    assert run.returncode != 0
    assert (
        f"datasets.{DATASET}.path: image folder {tmp_path / 'imagez'} does not exist" in run.output
    )
    config = tiny_config(tmp_path / "images")
    config["datasets"][DATASET]["classes"] = [0, 2]
    config["datasets"][DATASET]["comparison"] = {
        "classes": [5],
        "seeds": [0],
        "machines": ["bbels"],
    }
    write_config(workdir, config)
    run = run_snakemake(workdir, "-n", check=False)
    assert f"datasets.{DATASET}.classes: class ids [2] do not exist" in run.output
    assert "has 2 class(es), ids 0..1 (c0, c1)" in run.output
    del config["datasets"][DATASET]["classes"][1]
    write_config(workdir, config)
    run = run_snakemake(workdir, "-n", check=False)
    assert f"datasets.{DATASET}.comparison.classes: class ids [5] do not exist" in run.output
    assert snapshot(workdir) == before


def test_the_manifest_holds_content_hashes_not_paths(workdir, tmp_path):
    folder = tmp_path / "images"
    content = inputs.manifest(DATASET, {"source": "imagefolder", "path": str(folder)})
    assert content["class_names"] == ["c0", "c1"]
    first = content["files"][0]
    assert first == [
        "c0/img0.png",
        hashlib.sha256((folder / "c0" / "img0.png").read_bytes()).hexdigest(),
        0,
    ]
    # a copy of the folder elsewhere has the same key; a changed channel count does not
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    again = inputs.manifest(DATASET, {"source": "imagefolder", "path": str(moved)})
    assert inputs.key_of(again) == inputs.key_of(content)
    gray_key = inputs.key_of({**content, "channels": 1})
    rgb_key = inputs.key_of({**content, "channels": 3})
    assert gray_key != rgb_key


def test_select_copies_the_version_and_keeps_the_last_few(tmp_path):
    versions = tmp_path / "inputs"
    for i in range(5):
        version = versions / f"{i:016x}"
        version.mkdir(parents=True)
        (version / "train.safetensors").write_bytes(bytes([i]))
        (version / "meta.json").write_text(str(i))
        os.utime(version / "train.safetensors", ns=(i * 10**9, i * 10**9))
    chosen = versions / f"{0:016x}"  # the oldest, as when going back to an earlier config
    os.utime(chosen / "train.safetensors")
    train, meta = tmp_path / "train.safetensors", tmp_path / "meta.json"
    inputs.select(chosen / "train.safetensors", chosen / "meta.json", train, meta)
    assert train.read_bytes() == bytes([0]) and meta.read_text() == "0"
    kept = sorted(p.name for p in versions.iterdir())
    assert kept == [f"{i:016x}" for i in (0, 3, 4)]
