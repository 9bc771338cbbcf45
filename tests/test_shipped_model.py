"""The CNN shipped in models/: its weights load from safetensors with the shapes of their
architecture and the sha256 of their provenance JSON; the committed training config reproduces the
start of the shipped loss curve; a shipped model's comparison reads the pipeline's own samples."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from els.cnn.provenance import PROVENANCE_FORMAT, provenance_path, verify_weights
from els.cnn.workflow import CnnRules, check_shipped

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "FashionMNIST_resnet32x6_zeros.safetensors"
CONFIG = ROOT / "configs" / "cnn_cpu_fashion_mnist.yaml"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_shipped_weights_load_with_their_shapes_and_sha256():
    record = verify_weights(WEIGHTS, provenance_path(WEIGHTS))
    assert record["format"] == PROVENANCE_FORMAT and record["parameters"] == 133089
    assert record["training_images"] == 60000 and record["max_train_per_class"] is None
    section = yaml.safe_load(CONFIG.read_text())["cnn"]
    assert record["steps"] == section["train"]["steps"]
    assert (
        record["model_config"]["channels"] == section["models"][record["name"]]["model"]["channels"]
    )
    assert WEIGHTS.stat().st_size <= 20 * 2**20


def test_changed_weights_are_refused(tmp_path):
    weights = tmp_path / WEIGHTS.name
    shutil.copy(WEIGHTS, weights)
    shutil.copy(provenance_path(WEIGHTS), provenance_path(weights))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        verify_weights(weights, provenance_path(weights))
    with pytest.raises(ValueError, match="safetensors"):
        verify_weights(tmp_path / "model.pt")


def test_a_tensor_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from els.cnn.models import read_metadata

    tensors = load_file(str(WEIGHTS))
    tensors["conv_in.bias"] = torch.zeros(31)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=read_metadata(WEIGHTS))
    with pytest.raises((ValueError, RuntimeError), match="conv_in.bias|size mismatch"):
        verify_weights(broken)


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's FashionMNIST (apt-get install dataset-fashion-mnist)",
)
def test_the_committed_config_reproduces_the_start_of_the_loss_curve(tmp_path):
    """The first logged loss (mean of steps 1-25) of a run of the committed config on all 60000
    images equals the shipped loss.csv's up to float rounding (thread count, CPU type)."""
    from els.cnn import stages
    from els.cnn.train import train_noise_predictor
    from els.data import prepare_dataset

    data = tmp_path / "train.safetensors"
    prepare_dataset(
        "FashionMNIST",
        tmp_path / "raw",
        data,
        local_dirs=[DEBIAN_FASHION_MNIST],
        allow_download=False,
        allow_apt=False,
        prefer_local=True,
    )
    section = yaml.safe_load(CONFIG.read_text())["cnn"]
    settings = stages.resolve_settings(section, "resnet32x6_zeros", 10)
    images, labels = stages.training_set(settings, data)
    assert images.shape[0] == 60000
    train_noise_predictor(
        settings.model, settings.train, images, labels, tmp_path / "work", stop_after=25,
        progress=False,
    )  # fmt: skip
    with open(tmp_path / "work" / "loss.csv") as f:
        ours = list(csv.DictReader(f))
    with open(WEIGHTS.with_name("FashionMNIST_resnet32x6_zeros_loss.csv")) as f:
        shipped = list(csv.DictReader(f))
    assert ours[0]["step"] == shipped[0]["step"] == "25"
    assert float(ours[0]["loss"]) == pytest.approx(float(shipped[0]["loss"]), rel=1e-3)


def _shipped_section(tmp_path, schedule: str) -> dict:
    return {
        "dataset": "FashionMNIST",
        "classes": [3],
        "max_train_per_class": 32,
        "models": {
            "m": {
                "model": {"arch": "resnet", "channels": 32, "num_blocks": 6, "emb_dim": 64},
                "weights": str(WEIGHTS),
                "schedule": schedule,
            }
        },
        "evaluation": {"seeds": [0, 1]},
        "calibration": {"seeds": [1000]},
    }


def test_a_shipped_model_needs_the_pipeline_to_sample_its_comparison(tmp_path):
    schedule = tmp_path / "k.txt"
    schedule.write_text(" ".join(["3"] * 20) + "\n")
    other = tmp_path / "other.txt"
    other.write_text(" ".join(["5"] * 20) + "\n")
    section = _shipped_section(tmp_path, str(schedule))
    dataset = {
        "classes": [3],
        "seeds": [0, 1],
        "max_train_per_class": 32,
        "machines": ["bbels", "ideal"],
        "schedules": {"bbels": str(schedule), "ideal": str(schedule)},
    }
    sample = "results/samples/{dataset}/{machine}/{cls}/seed{seed}.safetensors"
    rules = CnnRules(section, {"datasets": {"FashionMNIST": dataset}}, pipeline_sample=sample)
    wc = type("W", (), {"dataset": "FashionMNIST", "model": "m"})()
    assert rules.model_file(wc) == str(WEIGHTS) and rules.scales_file(wc) == str(schedule)
    assert rules.machine_samples(wc) == [
        f"results/samples/FashionMNIST/{m}/3/seed{s}.safetensors"
        for m in ("bbels", "ideal")
        for s in (0, 1)
    ]
    assert not any("loss.png" in t or "scales.txt" in t for t in rules.targets())
    for change, message in (
        ({"seeds": [0]}, "ideal class 3 seed 1|seed 1"),
        ({"machines": ["bbels"]}, "ideal class 3 seed 0"),
        ({"max_train_per_class": None}, "max_train_per_class"),
        ({"schedules": {"bbels": str(other), "ideal": str(schedule)}}, "schedules.bbels"),
    ):
        with pytest.raises(ValueError, match=message):
            check_shipped(rules.section, "m", {"datasets": {"FashionMNIST": {**dataset, **change}}})
    with pytest.raises(ValueError, match="datasets: has no 'FashionMNIST'"):
        check_shipped(rules.section, "m", {"datasets": {}})


def test_shipped_provenance_is_plain_json():
    record = json.loads(provenance_path(WEIGHTS).read_text())
    assert record["weights_file"] == WEIGHTS.name and len(record["weights_sha256"]) == 64


@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="no FashionMNIST copy on this machine (apt-get install dataset-fashion-mnist)",
)
def test_the_default_config_compares_the_shipped_cnn_end_to_end(tmp_path):
    """config.yaml's cnn: section through the Snakefile on a subset (class 3, 2 seeds, 32 training
    images, no machine comparison): the data rule on the real copy (60000 images, 6000 per class,
    8-bit levels in [-1, 1]); no training, the CNN sampled from the machines' noise, and r2.csv with
    one row per seed and both r^2 and R^2 of each compared machine in [-1, 1]."""
    import pandas as pd
    from tiny_workflow import run_snakemake, write_config

    from els.data import load_prepared
    from els.index import to_float
    from els.io import read_json

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    dataset = config["datasets"]["FashionMNIST"]
    schedule = str(ROOT / dataset["schedules"]["bbels"])
    dataset.update(
        classes=[3], seeds=[0, 1], max_train_per_class=32, machines=["bbels", "ideal"],
        schedules={"bbels": schedule, "ideal": schedule},
    )  # fmt: skip
    dataset.pop("comparison")
    config["data"].update(
        local_dirs=[str(DEBIAN_FASHION_MNIST)], allow_download=False, allow_apt=False
    )
    section = config["cnn"]
    section.update(classes=[3], max_train_per_class=32)
    section["calibration"]["reference"] = str(ROOT / section["calibration"]["reference"])
    (name,) = section["models"]
    section["models"][name]["schedule"] = schedule  # weights: found in the workflow's folder
    write_config(tmp_path, config)
    run = run_snakemake(tmp_path, "--cores", "2", timeout=1200)
    assert "rule train_cnn:" not in run.output and "rule calibrate_schedule:" not in run.output
    prepared = tmp_path / "results" / "data" / "FashionMNIST" / "train.safetensors"
    images, labels = load_prepared(prepared)
    assert images.shape == (60000, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [6000] * 10
    meta = read_json(prepared.with_name("meta.json"))
    assert meta["images_per_class"] == {str(c): 6000 for c in range(10)}
    assert meta["class_names"][3] == "Dress" and meta["source"].startswith("local:")
    values = to_float(images[:2000], torch.float64)
    assert values.min() >= -1 and values.max() <= 1
    levels = (values + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-9)  # 8-bit levels
    assert len(torch.unique(levels)) == 256
    table = pd.read_csv(tmp_path / "results" / "summary.csv")
    assert sorted(zip(table.machine, table.seed, strict=True)) == [
        (m, s) for m in ("bbels", "ideal") for s in (0, 1)
    ]
    assert (table.n_train == 32).all() and (table["class"] == 3).all()
    out = tmp_path / "results" / "cnn" / "FashionMNIST" / name
    with (out / "r2.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["class"], r["seed"]) for r in rows] == [("3", "0"), ("3", "1")]
    for row in rows:
        for column in ("r2_bbels", "r2_ideal", "R2_bbels", "R2_ideal"):
            assert -1.0 <= float(row[column]) <= 1.0, (column, row)
        assert float(row["R2_bbels"]) <= float(row["r2_bbels"]) + 1e-9
    for file in ("r2_summary.csv", "r2_paper.csv", "r2_scatter.png", "samples_grid.png"):
        assert (out / file).stat().st_size > 0, file
