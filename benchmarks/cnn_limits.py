"""What limits the shipped CNN's agreement with bbELS: training length and capacity, measured.

Trains the shipped model's config (configs/cnn_cpu_fashion_mnist.yaml) up to --stop-after steps
(the shipped run's own state at that step: the same data order, noise and learning rates) and a
narrower variant (--narrow channels) for the same steps; samples each from a finished default run's
noise (its CNN classes and seeds, 20 steps) and computes the paper's r^2 (squared Pearson r of the
centred, flattened images) against that run's bbELS (calibrated schedule) and IS samples. The
shipped model (all its steps) is evaluated the same way as the reference row.

    .venv/bin/python benchmarks/cnn_limits.py --run . --out results/benchmarks/cnn_limits.csv

Writes one row per (model, class, seed) and prints the medians per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from els.cnn import load_model, pearson_r, sample_cnn, train_noise_predictor
from els.cnn.stages import resolve_settings, training_set
from els.io import read_sample

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cnn_cpu_fashion_mnist.yaml"
SHIPPED = (
    Path(__file__).resolve().parents[1] / "models" / "FashionMNIST_resnet32x6_zeros.safetensors"
)
MODEL = "resnet32x6_zeros"


def agreement(model, name, steps, train_s, loss, params, run, classes, seeds, n_steps):
    """Per (class, seed): r^2 of the model's sample against the run's bbELS and IS samples."""
    rows = []
    for cls in classes:
        machine = {
            kind: [
                read_sample(run / "results" / "samples" / "FashionMNIST" / kind / str(cls) / f"seed{s}.safetensors")
                for s in seeds
            ]
            for kind in ("bbels", "ideal")
        }  # fmt: skip
        noise = torch.stack([sample.noise for sample in machine["bbels"]])
        labels = torch.full((len(seeds),), cls, dtype=torch.long)
        with torch.no_grad():
            cnn = sample_cnn(model, noise, labels, n_steps, disable=True)
        r = {kind: pearson_r(cnn, torch.stack([s.image for s in v])) for kind, v in machine.items()}
        for i, seed in enumerate(seeds):
            rows.append({"model": name, "train_steps": steps, "parameters": params,
                         "train_s": train_s, "final_loss": loss, "class": cls, "seed": seed,
                         "r2_bbels": float(r["bbels"][i]) ** 2,
                         "r2_ideal": float(r["ideal"][i]) ** 2})  # fmt: skip
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("."), help="a finished default run's folder")
    p.add_argument("--stop-after", type=int, default=1000, help="training steps of the variants")
    p.add_argument("--narrow", type=int, default=16, help="channels of the narrower variant")
    p.add_argument("--classes", type=int, nargs="+", help="default: the config's (0-9)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the default run's seeds")
    p.add_argument("--work", type=Path, default=Path("results/benchmarks/cnn_limits"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    section = yaml.safe_load(CONFIG.read_text())["cnn"]
    settings = resolve_settings(section, MODEL, num_classes=10)
    classes, seeds = args.classes or list(settings.classes), args.seeds
    data = args.run / "results" / "data" / "FashionMNIST" / "train.safetensors"

    shipped = load_model(SHIPPED)
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    rows = agreement(shipped, f"{MODEL} (shipped)", record["steps"], record["wall_seconds"],
                     record["final_loss"], record["parameters"], args.run, classes, seeds,
                     settings.n_steps)  # fmt: skip
    images, labels = training_set(settings, data)
    variants = {
        MODEL: settings.model,
        f"resnet{args.narrow}x{settings.model.num_blocks}_zeros": dataclasses.replace(
            settings.model, channels=args.narrow
        ),
    }
    for name, model_config in variants.items():
        start = time.perf_counter()
        result = train_noise_predictor(
            model_config, settings.train, images, labels, args.work / name,
            stop_after=args.stop_after, progress=False,
        )  # fmt: skip
        train_s = time.perf_counter() - start
        print(f"{name}: {result.steps} steps in {train_s:.0f} s, loss {result.final_loss:.4f}")
        rows += agreement(result.model, name, result.steps, train_s, result.final_loss,
                          result.parameters, args.run, classes, seeds, settings.n_steps)  # fmt: skip
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    summary = table.groupby("model", sort=False).agg(
        parameters=("parameters", "first"), train_steps=("train_steps", "first"),
        train_s=("train_s", "first"), final_loss=("final_loss", "first"),
        r2_bbels=("r2_bbels", "median"), r2_ideal=("r2_ideal", "median"),
    )  # fmt: skip
    print(summary.to_string())


if __name__ == "__main__":
    main()
