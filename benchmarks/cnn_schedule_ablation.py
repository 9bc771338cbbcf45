"""How much of the gap between the shipped CNN and bbELS is the schedule: r^2 of bbELS against the
CNN with each given schedule, from the CNN's own noise, over a finished default run's CNN samples.

    .venv/bin/python benchmarks/cnn_schedule_ablation.py --run . --out results/benchmarks/ablation.csv \
        scales/FashionMNIST_resnet32x6_zeros_calibrated.txt scales/FashionMNIST_ResNet_zeros_conditional.txt

Writes one row per (schedule, class, seed) with r^2 (the paper's squared Pearson r) and prints the
median per schedule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

import els
from els.cnn.evaluate import pearson_r
from els.data import load_prepared
from els.scales import read_scales


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("schedules", nargs="+", type=Path)
    p.add_argument("--run", type=Path, default=Path("."), help="a finished default run's folder")
    p.add_argument("--model", default="resnet32x6_zeros")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    samples = args.run / "results" / "cnn" / "FashionMNIST" / args.model / "samples" / "cnn"
    data = args.run / "results" / "data" / "FashionMNIST" / "train.safetensors"
    rows = []
    for file in sorted(samples.glob("*.safetensors"), key=lambda f: int(f.stem)):
        cls = int(file.stem)
        cnn = load_file(file)
        train, _ = load_prepared(data, cls=cls)
        for schedule in args.schedules:
            scales = read_scales(schedule)
            index = els.PatchIndex.build(train, "bbels", els.schedule_patch_sizes("bbels", scales))
            start = time.perf_counter()
            with torch.no_grad():
                image = els.sample("bbels", None, scales, cnn["noise"], index=index, disable=True)
            seconds = time.perf_counter() - start
            r = pearson_r(cnn["image"], image)
            for i, seed in enumerate(cnn["seeds"].tolist()):
                rows.append({"schedule": schedule.name, "class": cls, "seed": seed,
                             "r2": float(r[i]) ** 2,
                             "sample_s": seconds / len(cnn["seeds"])})  # fmt: skip
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.groupby("schedule")["r2"].median())


if __name__ == "__main__":
    main()
