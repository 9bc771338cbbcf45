"""benchmarks/run_benchmark.py end to end on a tiny FashionMNIST-format set: every section runs and
writes its table, and the numbers in it are the ones the README's Speed section reads."""

import hashlib
import sys
from pathlib import Path

import pandas as pd
import torch
from data_factory import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    IMAGES_FILE,
    LABELS_FILE,
    idx_bytes,
    write_idx_dataset,
)

from els import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import run_benchmark  # noqa: E402


def tiny_fashion_mnist(tmp_path, monkeypatch) -> Path:
    images, labels = write_idx_dataset(tmp_path / "fashion-mnist", num_classes=10)
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


def test_benchmark_runs_every_section_and_writes_its_tables(tmp_path, monkeypatch, capsys):
    prepared = tiny_fashion_mnist(tmp_path, monkeypatch)
    out = tmp_path / "bench"
    run_benchmark.main(
        [
            "--data",
            str(prepared),
            "--n-train",
            "8",
            "--ks",
            "3,5",
            "--batches",
            "1,2",
            "--baseline-batch8-ks",
            "5",
            "--r2-classes",
            "1,3",
            "--r2-seeds",
            "1",
            "--r2-fractions",
            "0.5,1.0",
            "--out",
            str(out),
            "--name",
            "t",
        ]
    )
    assert "lockstep exact == els.sample bit for bit: True" in capsys.readouterr().out
    assert torch.is_grad_enabled(), "the benchmark left autograd off for its caller"

    evals = pd.read_csv(out / "t_evals.csv")
    assert set(evals["mode"]) == {"baseline", "exact", "fast"}
    assert sorted(set(evals["k"])) == [3, 5] and sorted(set(evals["batch"])) == [1, 2]
    exact = evals[evals["mode"] == "exact"]
    # exact mode equals the baseline up to float32 rounding wherever the baseline ran
    assert (exact["max_abs_diff_vs_baseline"].dropna() <= 1e-4).all()
    assert (evals["seconds"] > 0).all() and (evals["peak_memory_gb"] > 0).all()
    # batch 2 at k = 3 reuses the baseline's batch-1 time (not run there): flagged in the table
    k3b2 = evals[(evals["k"] == 3) & (evals["batch"] == 2) & (evals["mode"] == "exact")]
    assert k3b2["baseline_batch"].item() == 1

    samples = pd.read_csv(out / "t_samples.csv").set_index(["batch", "mode"])
    assert samples.loc[(1, "exact"), "max_abs_diff_vs_baseline"] <= 1e-4
    assert samples.loc[(1, "exact"), "ratio_to_baseline"] > 0
    assert samples.loc[(2, "exact"), "max_abs_diff_vs_exact"] == 0
    assert 0 < samples.loc[(1, "fast"), "r2_vs_exact"] <= 1

    r2 = pd.read_csv(out / "t_r2.csv")
    overall = r2[r2["cls"] == "all"].set_index("fast_fraction")
    assert overall.loc[0.5, "seeds"] == 2
    # fraction 1.0 is the whole training set: fast mode is then exact mode (without the pruning,
    # so up to float rounding)
    assert overall.loc[1.0, "r2_vs_exact"] >= 1 - 1e-9
    assert overall.loc[1.0, "max_abs_diff"] <= 1e-4
    assert overall.loc[0.5, "r2_vs_exact"] < 1


def test_sample_modes_limit_the_full_samples(tmp_path, monkeypatch):
    prepared = tiny_fashion_mnist(tmp_path, monkeypatch)
    out = tmp_path / "bench"
    common = ["--data", str(prepared), "--n-train", "8", "--batches", "1", "--r2-classes", ""]
    run_benchmark.main(
        common + ["--no-evals", "--sample-modes", "exact,fast", "--out", str(out), "--name", "m"]
    )
    samples = pd.read_csv(out / "m_samples.csv")
    assert list(samples["mode"]) == ["exact", "fast"]  # no baseline: not asked for
    assert samples["ratio_to_baseline"].isna().all()


def test_nearest_only_tradeoff_runs_in_lockstep_with_exact_mode(tmp_path, monkeypatch, capsys):
    import els.blocks
    from benchmarks import nearest_only_tradeoff

    prepared = tiny_fashion_mnist(tmp_path, monkeypatch)
    out = tmp_path / "nearest.csv"
    margin = els.blocks.EXTRA_MARGIN
    nearest_only_tradeoff.main(
        ["--data", str(prepared), "--n-train", "8", "--extras", "0,-15", "--out", str(out)]
    )
    assert els.blocks.EXTRA_MARGIN == margin  # restored for the caller
    table = pd.read_csv(out).set_index("extra")
    assert list(table.index) == [margin, 0, -15]  # exact mode first: the reference
    assert table.loc[margin, "max_abs_diff"] == 0 and table.loc[margin, "r2"] == 1
    assert table.loc[0, "max_abs_diff"] <= 1e-4  # skipping weights below e^0 of the total
    assert (table["low_noise_s"] > 0).all() and (table["high_noise_s"] > 0).all()
    assert "extra=-15" in capsys.readouterr().out
