"""benchmarks/run_benchmark.py, gpu_benchmark.py (on the CPU), zoo_benchmark.py and cnn_limits.py end
to end on a tiny FashionMNIST-format set (every section runs and writes its table), and the
yardstick's evaluation against the loop implementation."""

import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from data_factory import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    IMAGES_FILE,
    LABELS_FILE,
    idx_bytes,
    write_idx_dataset,
)
from reference import random_8bit_images, random_images, ref_denoise

import els
from els import data
from els.index import to_float

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import (  # noqa: E402
    cnn_limits,
    gpu_benchmark,
    run_benchmark,
    workflow_jobs,
    zoo_benchmark,
)
from benchmarks.yardstick import interior_evaluation  # noqa: E402


@pytest.fixture(scope="module")
def tiny_fashion_mnist(tmp_path_factory) -> Path:
    """A prepared FashionMNIST-format file of the tiny IDX set, shared by this module's tests."""
    tmp_path = tmp_path_factory.mktemp("tiny_fashion_mnist")
    images, labels = write_idx_dataset(tmp_path / "fashion-mnist", num_classes=10)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(
            data.RECORDED_SHA256,
            "FashionMNIST",
            {
                IMAGES_FILE: hashlib.sha256(idx_bytes(images, IDX_IMAGES_MAGIC)).hexdigest(),
                LABELS_FILE: hashlib.sha256(idx_bytes(labels, IDX_LABELS_MAGIC)).hexdigest(),
            },
        )
        out = tmp_path / "train.safetensors"
        data.prepare_dataset(
            "FashionMNIST",
            tmp_path / "raw",
            out,
            local_dirs=[tmp_path / "fashion-mnist"],
            allow_download=False,
            allow_apt=False,
        )
    return out


def test_benchmark_runs_every_section_and_writes_its_tables(tmp_path, tiny_fashion_mnist):
    out = tmp_path / "bench"
    args = [
        "--data",
        str(tiny_fashion_mnist),
        "--n-train",
        "6",
        "--ks",
        "3,17",
        "--baseline-ks",
        "17",
    ]
    run_benchmark.main([*args, "--batches", "1,2", "--sample-batches", "1,2", "--out", str(out)])
    evals = pd.read_csv(out / "full_evals.csv")
    assert set(evals["mode"]) == {"baseline", "exact", "exact+n_eff", "exact+sources"}
    exact17 = evals[(evals["k"] == 17) & (evals["mode"] == "exact") & (evals["batch"] == 1)]
    assert exact17["max_abs_diff_vs_baseline"].item() < 1e-4  # the same machine
    samples = pd.read_csv(out / "full_samples.csv")
    assert list(samples["batch"]) == [1, 2]
    assert (samples["max_abs_diff_vs_float64"] < 1e-3).all()
    assert (samples["index_mb"] < 10 * samples["class_uint8_mb"] + 0.01).all()


def test_gpu_benchmark_writes_a_row_per_batch_with_the_device_and_the_cpu_difference(
    tmp_path, tiny_fashion_mnist
):
    # on the CPU the "device" sample is the CPU kernel's own: the same bits as the reference sample
    out = tmp_path / "bench"
    args = ["--data", str(tiny_fashion_mnist), "--n-train", "4", "--batches", "1,2"]
    gpu_benchmark.main([*args, "--device", "cpu", "--out", str(out)])
    table = pd.read_csv(out / "full_gpu_samples.csv")
    assert list(table["batch"]) == [1, 2]
    assert table["device"].str.startswith("cpu").all()
    assert (table["max_abs_diff_vs_cpu"] == 0).all()
    assert (table["per_sample_s"] > 0).all()


def test_zoo_benchmark_writes_a_row_per_machine_and_the_ratio_to_bbels(
    tmp_path, tiny_fashion_mnist
):
    out = tmp_path / "zoo.csv"
    zoo_benchmark.main(["--data", str(tiny_fashion_mnist), "--quick", "--out", str(out)])
    table = pd.read_csv(out)
    assert list(table["machine"]) == [*els.ZOO_KINDS, "bbels"]
    assert (table["sample_s"] > 0).all() and table["ratio_to_bbels"].iloc[-1] == 1.0


def test_yardstick_evaluation_is_the_interior_of_bbels():
    train8 = random_8bit_images(4, 1, 9, 9, seed=1)
    x = random_images(1, 1, 9, 9, seed=2, dtype=torch.float32)
    for k, t in ((3, 0.05), (5, 0.95)):
        ref = ref_denoise("bbels", x.double(), t, to_float(train8, torch.float64), k)
        h = k // 2
        got = interior_evaluation(x, train8, k, t)
        assert (got.double() - ref[0, 0, h : 9 - h, h : 9 - h]).abs().max() < 1e-4


def test_cnn_limits_trains_the_variants_and_writes_r2_per_model_and_seed(
    tmp_path, tiny_fashion_mnist
):
    """A 'finished run' of class 0, seeds 0 and 1 (bbELS and IS sample files from the pipeline's
    noise): the shipped model and the two variants (2 training steps here) each get one row per
    seed with r^2 against both machines."""
    from els.io import write_sample
    from els.noise import noise_for

    run = tmp_path / "run"
    data_dir = run / "results" / "data" / "FashionMNIST"
    data_dir.mkdir(parents=True)
    (data_dir / "train.safetensors").write_bytes(tiny_fashion_mnist.read_bytes())
    samples = run / "results" / "samples" / "FashionMNIST"
    generator = torch.Generator().manual_seed(0)
    for kind in ("bbels", "ideal"):
        for seed in (0, 1):
            write_sample(
                samples / kind / "0" / f"seed{seed}.safetensors",
                noise=noise_for("FashionMNIST", 0, seed, (1, 32, 32)),
                image=torch.rand(1, 32, 32, generator=generator) * 2 - 1,
                metadata={"machine": kind},
            )
    out = tmp_path / "limits.csv"
    args = ["--run", str(run), "--classes", "0", "--stop-after", "2", "--narrow", "8"]
    cnn_limits.main([*args, "--work", str(tmp_path / "work"), "--out", str(out)])
    table = pd.read_csv(out)
    assert list(table["model"].unique()) == [
        "resnet32x6_zeros (shipped)",
        "resnet32x6_zeros",
        "resnet8x6_zeros",
    ]
    assert table.groupby("model")["seed"].apply(list).map(sorted).tolist() == [[0, 1]] * 3
    assert (table.loc[table["model"] != "resnet32x6_zeros (shipped)", "train_steps"] == 2).all()
    for column in ("r2_bbels", "r2_ideal"):
        assert table[column].between(0.0, 1.0).all()


def test_workflow_jobs_sums_the_benchmark_files_per_rule_and_machine(tmp_path):
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    jobs = {
        "sample_batch/MNIST/bbels/0/seeds0-1.tsv": (10.0, 9.0),
        "sample_batch/MNIST/bbels/1/seeds0-1.tsv": (20.0, 18.0),
        "sample_batch/MNIST/ideal/0/seeds0-1.tsv": (2.0, 1.5),
        "summary/summary.tsv": (1.0, 0.5),
    }
    for name, (wall, cpu) in jobs.items():
        path = tmp_path / "benchmarks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{wall}\t0:00:{wall}\t1\t1\t1\t1\t0\t0\t90\t{cpu}\n")
    out = tmp_path / "jobs.csv"
    workflow_jobs.main([str(tmp_path / "benchmarks"), str(out)])
    table = pd.read_csv(out, keep_default_na=False).set_index(["rule", "machine"])
    assert table.loc[("sample_batch", "bbels")].tolist() == [2, 30.0, 27.0, 0.909]
    assert table.loc[("sample_batch", "ideal")].tolist() == [1, 2.0, 1.5, 0.061]
    assert table.loc[("summary", "")].tolist() == [1, 1.0, 0.5, 0.03]
    assert table.loc[("total", "")].tolist() == [4, 33.0, 29.0, 1.0]
    assert list(table.index)[0] == ("sample_batch", "bbels")  # the longest first
    with pytest.raises(SystemExit, match="no Snakemake benchmark files"):
        workflow_jobs.main([str(tmp_path / "empty"), str(out)])
