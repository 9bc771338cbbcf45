"""The zoo's denoisers through the Snakemake workflow: one tiny run (an image folder of 2 classes x 4
images, class 0, seed 0, a 3-step schedule) with wiener and scfdm in the comparison:
the statistics stage, sampling from it, provenance where it applies (not wiener), the summary rows
and the comparison figure."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_workflow import make_workdir, run_snakemake, write_image_folder

import els
from els.data import load_prepared
from els.io import read_json, read_safetensors, read_sample

MACHINES = ["wiener", "scfdm"]  # pca_locality and the rest: tests/test_zoo.py


def zoo_config(folder) -> dict:
    return {
        "datasets": {
            "Tiny": {
                "source": "imagefolder",
                "path": str(folder),
                "channels": 1,
                "conditional": True,
                "classes": [0],
                "seeds": [0],
                "machines": ["scfdm"],
                "schedules": {m: "scales/tiny.txt" for m in MACHINES},
                "comparison": {"classes": [0], "seeds": [0], "machines": MACHINES},
            }
        },
        "data": {"allow_download": False, "allow_apt": False, "local_dirs": []},
        "sampling": {
            "device": "cpu",
            "batch_seeds": 1,
            "trajectory": False,
            "provenance": True,
        },
        "zoo": {"scfdm": {"n_noise": 3, "top_k": 3}},
        "resources": {
            stage: {"threads": 1, "mem_mb": 500, "runtime": 10}
            for stage in ("data", "stats", "sample", "seed", "figures")
        },
    }


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    folder = write_image_folder(root / "images")
    workdir = make_workdir(root / "work", zoo_config(folder))
    run = run_snakemake(workdir, "--cores", "2")
    return workdir, run.output


def test_statistics_stage_and_samples(zoo_run):
    workdir, output = zoo_run
    results = workdir / "results"
    assert not (results / "index").exists()  # no patch index for the zoo's denoisers
    train, _ = load_prepared(results / "data" / "Tiny" / "train.safetensors", cls=0)
    stats = els.ZooStats.load(results / "stats" / "Tiny" / "0.safetensors", images=train)
    assert stats.mean.dtype == torch.float64 and stats.images.shape[0] == 4
    noises = []
    for machine in MACHINES:
        sample = read_sample(results / "samples" / "Tiny" / machine / "0" / "seed0.safetensors")
        assert sample.metadata["machine"] == machine and sample.metadata["n_train"] == "4"
        assert sample.metadata["index_fingerprint"] == stats.fingerprint
        assert len(sample.k) == 2  # 3 entries = 2 steps
        noises.append(sample.noise)
    assert all(torch.equal(n, noises[0]) for n in noises)  # the same noise through each machine
    batch = read_safetensors(
        results / "samples" / "Tiny" / "scfdm" / "0" / "batches" / "seeds0-0.safetensors"
    )[1]
    # the config's values, the rest from the schema's defaults
    params = {"n_noise": 3, "top_k": 3, "sigma": 0.1, "temperature": 1.0}
    assert json.loads(batch["zoo_params"]) == params


def test_provenance_where_it_applies_and_summary_rows(zoo_run):
    workdir, _ = zoo_run
    results = workdir / "results"
    assert not (results / "provenance" / "Tiny" / "wiener").exists()
    record = read_json(results / "provenance" / "Tiny" / "scfdm" / "0" / "seed0.json")
    assert record["n_sources"] == 1  # an image-level machine: one dominant image per sample
    table = pd.read_csv(results / "summary.csv")
    assert sorted(table["machine"]) == sorted(MACHINES)
    wiener = table[table["machine"] == "wiener"].iloc[0]
    assert pd.isna(wiener["n_sources"])  # no dominant training image
    assert table[table["machine"] == "scfdm"]["n_sources"].notna().all()
    assert (table["nn_distance_in_class"] >= 0).all()


def test_comparison_figure_of_every_machine(zoo_run):
    workdir, _ = zoo_run
    path = workdir / "results" / "figures" / "Tiny" / "comparison" / "0" / "seed0.png"
    width, height = Image.open(path).size
    assert width > height > 0  # one band of two columns
