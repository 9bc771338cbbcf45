"""The zoo's denoisers through the Snakemake workflow, in the full tiny run (tests/tiny_workflow.py:
MNIST-format data, 6 images per class, class 1 seed 0, a 4-step schedule) whose comparison has
wiener and scfdm beside the patch machines: the statistics stage, sampling from it, provenance where
it applies (not wiener), the summary rows and the comparison figure of every machine."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_workflow import full_run

import els
from els.data import load_prepared
from els.io import read_json, read_safetensors, read_sample

pytestmark = pytest.mark.slow

MACHINES = ["wiener", "scfdm"]  # pca_locality and the rest: tests/test_zoo.py


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory):
    workdir, _, output = full_run(tmp_path_factory)
    return workdir, output


def test_statistics_stage_and_samples(zoo_run):
    workdir, _ = zoo_run
    results = workdir / "results"
    # a patch index for the patch machines only, statistics for the class of the zoo's samples
    assert sorted(p.name for p in (results / "index" / "MNIST").iterdir()) == [
        "bbels",
        "els",
        "ideal",
        "ls",
    ]
    assert [p.name for p in (results / "stats" / "MNIST").iterdir()] == ["1.safetensors"]
    train, _ = load_prepared(
        results / "data" / "MNIST" / "train.safetensors", cls=1, max_per_class=6
    )
    stats = els.ZooStats.load(results / "stats" / "MNIST" / "1.safetensors", images=train)
    assert stats.mean.dtype == torch.float64 and stats.images.shape[0] == 6
    noises = []
    for machine in MACHINES:
        sample = read_sample(results / "samples" / "MNIST" / machine / "1" / "seed0.safetensors")
        assert sample.metadata["machine"] == machine and sample.metadata["n_train"] == "6"
        assert sample.metadata["index_fingerprint"] == stats.fingerprint
        assert len(sample.k) == 3  # 4 entries = 3 steps
        noises.append(sample.noise)
    bbels = read_sample(results / "samples" / "MNIST" / "bbels" / "1" / "seed0.safetensors")
    assert all(torch.equal(n, bbels.noise) for n in noises)  # the same noise through each machine
    batch = read_safetensors(
        results / "samples" / "MNIST" / "scfdm" / "1" / "batches" / "seeds0-1.safetensors"
    )[1]
    # the config's values, the rest from the schema's defaults
    params = {"n_noise": 3, "top_k": 3, "sigma": 0.1, "temperature": 1.0}
    assert json.loads(batch["zoo_params"]) == params


def test_provenance_where_it_applies_and_summary_rows(zoo_run):
    workdir, _ = zoo_run
    results = workdir / "results"
    assert not (results / "provenance" / "MNIST" / "wiener").exists()
    record = read_json(results / "provenance" / "MNIST" / "scfdm" / "1" / "seed0.json")
    assert record["n_sources"] == 1  # an image-level machine: one dominant image per sample
    table = pd.read_csv(results / "summary.csv")
    table = table[table["machine"].isin(MACHINES)]
    assert sorted(table["machine"]) == sorted(MACHINES)
    wiener = table[table["machine"] == "wiener"].iloc[0]
    assert pd.isna(wiener["n_sources"])  # no dominant training image
    assert table[table["machine"] == "scfdm"]["n_sources"].notna().all()
    assert (table["nn_distance_in_class"] >= 0).all()


def test_comparison_figure_of_every_machine(zoo_run):
    workdir, _ = zoo_run
    path = workdir / "results" / "figures" / "MNIST" / "comparison" / "1" / "seed0.png"
    width, height = Image.open(path).size
    # six machines: two bands (5 + 1) of samples above their nearest training images
    assert height > 0.7 * width > 0
