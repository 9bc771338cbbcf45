"""The whole Snakemake workflow on a tiny config, through `python -m snakemake` in a subprocess.

The tiny dataset is MNIST-format IDX files written by tests/data_factory.py (two classes of bar
images, 28x28, resized to 32x32 by the data rule); the machines use the first 6 images of each class
and a 4-step schedule. The module runs the workflow once and then checks every output, a no-op rerun,
batching, a schedule change and an added seed. The chain on the real FashionMNIST copy (Debian's
dataset-fashion-mnist) is tests/test_shipped_model.py's end-to-end run of the default config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_workflow import (
    FULL_COMPARISON,
    REPO,
    SNAKEFILE,
    Run,
    copy_of,
    full_run,
    run_snakemake,
    write_config,
)

from els.data import load_prepared
from els.index import to_float
from els.io import read_json, read_safetensors, read_sample

SUMMARY_COLUMNS = [
    "dataset",
    "machine",
    "class",
    "seed",
    "sample_path",
    "nn_index",
    "nn_class",
    "nn_distance",
    "nn_distance_in_class",
    "runtime_s",
    "n_sources",
    "top_source_share",
    "mean_dominant_weight",
]
RULES_WITH_FILES = [
    "prepare_data",
    "build_index",
    "build_stats",
    "sample_batch",
    "finish_seed",  # with finish_seed_without_provenance (wiener), whose logs are the same
    "grid_figure",
    "comparison_figure",
    "summary",
]


def snakemake(workdir: Path, *args: str, config: str = "config.yaml", check: bool = True) -> Run:
    """The workflow in workdir on 2 cores (tiny_workflow.run_snakemake); the log is in .output."""
    return run_snakemake(workdir, "--cores", "2", *args, config=config, check=check, timeout=1800)


def planned_jobs(output: str) -> set[tuple[str, tuple]]:
    """(rule, sorted wildcards) of every job a `snakemake -n -p` output lists."""
    jobs = set()
    for block in re.split(r"\n\s*\n", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not rule:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        items = tuple(sorted(wildcards[1].split(", "))) if wildcards else ()
        jobs.add((rule[1], items))
    return jobs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The full tiny run (tests/tiny_workflow.py): (workdir, config, the run's output)."""
    return full_run(tmp_path_factory)


@pytest.fixture
def changeable_run(tiny_run, tmp_path):
    """A copy of the full tiny run for a test that adds to it: (workdir, config)."""
    workdir, config, _ = tiny_run
    return copy_of(workdir, tmp_path / "work"), config


# ----------------------------------------------------------------------------- the tiny run


@pytest.mark.slow
def test_summary_has_one_row_per_sample_and_the_columns(tiny_run):
    workdir, config, _ = tiny_run
    table = pd.read_csv(workdir / "results" / "summary.csv")
    assert set(SUMMARY_COLUMNS) <= set(table.columns)
    expected = {("bbels", c, s) for c in (0, 1) for s in (0, 1)}
    expected |= {(m, 1, 0) for m in FULL_COMPARISON}
    assert {(r.machine, r["class"], r.seed) for _, r in table.iterrows()} == expected
    assert len(table) == len(expected) and (table.dataset == "MNIST").all()
    # every column is filled, but the mosaic numbers of wiener (no dominant training image)
    mosaic = ["n_sources", "top_source_share", "mean_dominant_weight"]
    assert table.notna()[[c for c in SUMMARY_COLUMNS if c not in mosaic]].all().all()
    table = table[table.machine != "wiener"]
    assert table.notna()[mosaic].all().all()
    assert (table.runtime_s > 0).all() and (table.runtime_s <= table.batch_runtime_s).all()
    assert (table.nn_distance <= table.nn_distance_in_class + 1e-9).all()
    # the ideal score copies one training image: every pixel from it; the local machines mix
    ideal = table[table.machine == "ideal"].iloc[0]
    assert ideal.top_source_share == 1.0 and ideal.n_sources == 1
    assert ((table.top_source_share > 0) & (table.top_source_share <= 1)).all()
    assert ((table.mean_dominant_weight > 0) & (table.mean_dominant_weight <= 1 + 1e-6)).all()


@pytest.mark.slow
def test_provenance_files_agree_with_the_summary(tiny_run):
    workdir, _, _ = tiny_run
    table = pd.read_csv(workdir / "results" / "summary.csv")
    assert not (workdir / "results" / "provenance" / "MNIST" / "wiener").exists()
    for _, row in table[table.machine != "wiener"].iterrows():
        stem = workdir / "results" / "provenance" / "MNIST" / row.machine / str(row["class"])
        tensors, meta = read_safetensors(stem / f"seed{row.seed}.safetensors")
        source = tensors["source_image"]
        assert source.shape == (32, 32) and tensors["n_eff"].shape == (3, 32, 32)
        assert (tensors["n_eff"] >= 1 - 1e-4).all()
        _, counts = torch.unique(source, return_counts=True)
        assert row.n_sources == len(counts)
        assert row.top_source_share == pytest.approx(counts.max().item() / source.numel())
        if row.machine in ("ideal", "ls", "scfdm"):  # these machines cannot move a patch
            assert torch.equal(tensors["source_row"], torch.arange(32).view(32, 1).expand(32, 32))


@pytest.mark.slow
def test_sample_files_neighbours_and_distances_are_consistent(tiny_run):
    workdir, _, _ = tiny_run
    table = pd.read_csv(workdir / "results" / "summary.csv")
    images, labels = load_prepared(workdir / "results" / "data" / "MNIST" / "train.safetensors")
    assert images.shape == (60000, 1, 32, 32) and images.dtype == torch.uint8
    train = to_float(images, torch.float64).reshape(len(images), -1)
    for _, row in table.iterrows():
        sample_path = workdir / row.sample_path
        sample = read_sample(sample_path)
        assert sample.image.shape == (1, 32, 32) and sample.noise.shape == (1, 32, 32)
        assert sample.image.dtype == torch.float32 and torch.isfinite(sample.image).all()
        assert len(sample.t) == len(sample.k) == 3 and sample.k == [5, 5, 3]
        assert sample.trajectory_x.shape == sample.trajectory_denoised.shape == (3, 1, 32, 32)
        assert torch.equal(sample.trajectory_x[-1], sample.image)
        assert sample.metadata["noise_key"] == f"MNIST/{row['class']}/{row.seed}"
        # the PNG is the sample, pixel for pixel
        png = np.asarray(Image.open(workdir / row.png_path))
        expected = ((sample.image[0].double() + 1) * 127.5).round().clamp(0, 255).numpy()
        assert np.array_equal(png, expected.astype(np.uint8))
        # nn_distance recomputed from the sample and the training set
        d = (train - sample.image.double().reshape(1, -1)).norm(dim=1)
        assert row.nn_index == int(d.argmin()) and row.nn_class == int(labels[row.nn_index])
        assert row.nn_distance == pytest.approx(float(d.min()), rel=1e-9, abs=1e-9)
        in_class = d.masked_fill(labels != row["class"], float("inf"))
        assert row.nn_distance_in_class == pytest.approx(float(in_class.min()), rel=1e-9, abs=1e-9)
        nn = read_json(
            workdir
            / "results"
            / "neighbours"
            / "MNIST"
            / row.machine
            / str(row["class"])
            / f"seed{row.seed}.json"
        )
        assert nn["nn_index"] == row.nn_index
        nn_images, _ = read_safetensors(
            Path(str(workdir / row.sample_path).replace("/samples/", "/neighbours/"))
        )
        assert torch.equal(nn_images["nearest"], images[row.nn_index])


@pytest.mark.slow
def test_same_noise_across_machines_and_ideal_score_copies_a_training_image(tiny_run):
    workdir, _, _ = tiny_run
    samples = {
        m: read_sample(workdir / f"results/samples/MNIST/{m}/1/seed0.safetensors")
        for m in FULL_COMPARISON
    }
    for m in FULL_COMPARISON:
        assert torch.equal(samples[m].noise, samples["ideal"].noise)
    assert not torch.equal(
        samples["bbels"].noise,
        read_sample(workdir / "results/samples/MNIST/bbels/1/seed1.safetensors").noise,
    )
    table = pd.read_csv(workdir / "results" / "summary.csv").set_index(["machine", "class", "seed"])
    ideal = table.loc[("ideal", 1, 0)]
    assert ideal.nn_distance_in_class < 1e-3 and ideal.nn_in_class_used_for_training


@pytest.mark.slow
def test_every_figure_the_report_and_every_log_exist(tiny_run):
    workdir, _, _ = tiny_run
    figures = workdir / "results" / "figures" / "MNIST"
    table = pd.read_csv(workdir / "results" / "summary.csv")
    expected = [figures / "grid_bbels.png", figures / "comparison" / "1" / "seed0.png"]
    for _, row in table.iterrows():
        kinds = ("pairs", "trajectories") + (("provenance",) if row.machine != "wiener" else ())
        for kind in kinds:
            expected.append(
                figures / kind / row.machine / str(row["class"]) / f"seed{row.seed}.png"
            )
    assert sorted(p for p in figures.rglob("*.png")) == sorted(expected)
    for path in expected:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 150
            assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas
    report = workdir / "results" / "report.html"
    assert report.is_file() and report.stat().st_size > 100_000
    for rule in RULES_WITH_FILES:
        logs = list((workdir / "logs" / rule).rglob("*.log"))
        benchmarks = list((workdir / "logs" / "benchmarks" / rule).rglob("*.tsv"))
        assert logs and len(logs) == len(benchmarks), rule
    sample_log = next((workdir / "logs" / "sample_batch").rglob("*.log")).read_text()
    assert "reverse steps" in sample_log and "3/3" in sample_log  # the tqdm bar
    assert re.search(r"sampled 2 seeds in \d+\.\d s", sample_log)  # the sampling time


@pytest.mark.slow
def test_rerun_does_nothing(tiny_run):
    workdir, _, _ = tiny_run
    out = snakemake(workdir, "-n").output
    assert "Nothing to be done" in out, out[-3000:]


BATCH_CASES = (("bbels", "0"), ("els", "1"), ("ideal", "1"))


def _batch_difference(workdir: Path, machine: str, cls: str, dtype: torch.dtype) -> float:
    """max |sample alone - sample in a batch of two|, sampled as the sample_batch rule does."""
    import els
    from els.noise import noise_for
    from els.scales import read_scales

    scales = read_scales(workdir / "scales" / "tiny.txt")
    index = els.PatchIndex.load(workdir / f"results/index/MNIST/{machine}/{cls}.safetensors")
    noise = torch.stack([noise_for("MNIST", cls, s, (1, 32, 32)) for s in (0, 1)])
    run = lambda x: els.sample(machine, None, scales, x, index=index, dtype=dtype, disable=True)  # noqa: E731
    pair = run(noise)
    return max(float((run(noise[s : s + 1])[0] - pair[s]).abs().max()) for s in (0, 1))


@pytest.mark.slow
@pytest.mark.parametrize("machine,cls", BATCH_CASES)
def test_batching_changes_a_float64_seed_by_at_most_1e_6(tiny_run, machine, cls):
    assert _batch_difference(tiny_run[0], machine, cls, torch.float64) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("machine,cls", BATCH_CASES)
def test_batching_changes_a_float32_seed_by_at_most_1e_6(tiny_run, machine, cls):
    assert _batch_difference(tiny_run[0], machine, cls, torch.float32) <= 1e-6


@pytest.mark.slow
def test_schedule_change_reruns_sampling_only(tiny_run):
    workdir, _, _ = tiny_run
    schedule = workdir / "scales" / "tiny.txt"
    original, stat = schedule.read_text(), schedule.stat()
    # an edit that keeps the patch sizes (Snakemake compares contents, not only times)
    schedule.write_text(original + "# edited\n")
    try:
        jobs = planned_jobs(snakemake(workdir, "-n", "-p").output)
    finally:
        schedule.write_text(original)
        os.utime(schedule, (stat.st_atime, stat.st_mtime))
    rules = {rule for rule, _ in jobs}
    assert "sample_batch" in rules and not rules & {"prepare_data", "build_index"}
    # bbELS: 2 classes x 1 batch; the comparison's other five machines: 1 batch each
    assert sum(rule == "sample_batch" for rule, _ in jobs) == 7
    assert "Nothing to be done" in snakemake(workdir, "-n").output


@pytest.mark.slow
def test_unknown_config_key_is_a_clear_error(tiny_run):
    workdir, config, _ = tiny_run
    bad = json.loads(json.dumps(config))
    bad["sampling"]["devise"] = "cpu"
    write_config(workdir, bad, "bad.yaml")
    result = snakemake(workdir, "-n", config="bad.yaml", check=False)
    assert result.returncode != 0 and "sampling.devise: unknown key" in result.output


@pytest.mark.slow
def test_adding_a_seed_runs_exactly_the_new_jobs(changeable_run):
    """Seed 2 (a new block: batch seeds2-3) for both classes; then seed 3 (block exists: no batch)."""
    workdir, config = changeable_run
    more = json.loads(json.dumps(config))
    more["datasets"]["MNIST"]["seeds"] = [0, 1, 2]
    write_config(workdir, more, "more.yaml")
    jobs = planned_jobs(snakemake(workdir, "-n", "-p", config="more.yaml").output)
    w = lambda **kv: tuple(sorted(f"{k}={v}" for k, v in kv.items()))  # noqa: E731
    expected = {("all", ())}
    expected.add(("summary", ()))
    expected.add(("grid_figure", w(dataset="MNIST", machine="bbels")))
    for cls in (0, 1):
        expected.add(
            ("sample_batch", w(dataset="MNIST", machine="bbels", cls=cls, batch="seeds2-3"))
        )
        expected.add(("finish_seed", w(dataset="MNIST", machine="bbels", cls=cls, seed=2)))
    assert jobs == expected
    snakemake(workdir, config="more.yaml")
    # 6 bbELS + the comparison's 5 other machines
    assert len(pd.read_csv(workdir / "results" / "summary.csv")) == 6 + len(FULL_COMPARISON) - 1
    # seed 3 lives in the block seeds2-3, already sampled: only per-seed jobs and the aggregates
    more["datasets"]["MNIST"]["seeds"] = [0, 1, 2, 3]
    write_config(workdir, more, "more.yaml")
    rules = {
        rule for rule, _ in planned_jobs(snakemake(workdir, "-n", "-p", config="more.yaml").output)
    }
    assert rules == {"all", "summary", "grid_figure", "finish_seed"}


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
# ----------------------------------------------------------------------------- lint


def test_snakemake_lint_is_clean(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--lint",
            "--snakefile",
            str(SNAKEFILE),
            "--directory",
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_check_passes():
    snakefmt = shutil.which("snakefmt", path=str(Path(sys.executable).parent)) or shutil.which(
        "snakefmt"
    )
    if snakefmt is None:
        pytest.skip("snakefmt is not installed")
    files = [str(SNAKEFILE), *map(str, sorted((REPO / "workflow" / "rules").glob("*.smk")))]
    result = subprocess.run([snakefmt, "--check", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
