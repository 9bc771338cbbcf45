"""One full-class sample of each of the zoo's denoisers (els.zoo) and of bbELS, in ONE process on
the same machine (ratios are what to compare: the cores may be shared), FashionMNIST class 3 (all
6000 training images) with the paper's FashionMNIST ResNet schedule (19 steps; the zoo ignores k).

    .venv/bin/python benchmarks/zoo_benchmark.py               # full: class 3, N = 6000, + bbELS
    .venv/bin/python benchmarks/zoo_benchmark.py --quick       # smoke version: N = 200
    .venv/bin/python benchmarks/zoo_benchmark.py --device cuda

Writes results/benchmarks/zoo_samples.csv: per machine the preparation (statistics or patch
indexes) and the sample's wall seconds, seconds per step, the ratio to bbELS, peak memory and the
1-minute load average before and after (the other users of a shared machine).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
from benchmarks.run_benchmark import FASHION_RESNET, PeakMemory  # noqa: E402
from els.data import load_prepared, prepare_dataset  # noqa: E402
from els.noise import noise_for, noise_key  # noqa: E402

FIELDS = [
    "machine",
    "n_train",
    "device",
    "threads",
    "steps",
    "prepare_s",
    "sample_s",
    "per_step_s",
    "ratio_to_bbels",
    "peak_memory_gb",
    "load_before",
    "load_after",
]


def training_images(path: Path, cls: int, n_train: int | None) -> torch.Tensor:
    if not path.is_file():
        prepare_dataset("FashionMNIST", "results/raw", path)
    images, _ = load_prepared(path, cls=cls, max_per_class=n_train)
    return images


def timed(fn, device):
    """fn's result, wall seconds, peak memory in GB (resident on a CPU, torch's on a GPU)."""
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakMemory() as mem:
        start = time.perf_counter()
        out = fn()
        if gpu:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if gpu else mem.peak
    return out, seconds, peak / 2**30


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("results/benchmarks/data/train.safetensors"))
    p.add_argument("--cls", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="200 training images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-bbels", action="store_true", help="skip the bbELS yardstick")
    p.add_argument("--kinds", nargs="+", default=list(els.ZOO_KINDS))
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/zoo_samples.csv"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    train = training_images(args.data, args.cls, 200 if args.quick else None)
    noise = noise_for("FashionMNIST", args.cls, 0, train.shape[1:]).unsqueeze(0)
    keys = [noise_key("FashionMNIST", args.cls, 0)]
    steps = len(FASHION_RESNET) - 1
    print(
        f"FashionMNIST class {args.cls}: {train.shape[0]} training images, {steps} steps, "
        f"device {device}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows = []

    def record(machine, prepare_s, sample_s, peak, load_before):
        rows.append(
            {
                "machine": machine,
                "n_train": train.shape[0],
                "device": str(device),
                "threads": torch.get_num_threads(),
                "steps": steps,
                # Significant figures, not decimals: a millisecond machine is not written as 0.
                "prepare_s": f"{prepare_s:.3g}",
                "sample_s": f"{sample_s:.3g}",
                "per_step_s": f"{sample_s / steps:.3g}",
                "peak_memory_gb": f"{peak:.2f}",
                "load_before": f"{load_before:.2f}",
                "load_after": f"{os.getloadavg()[0]:.2f}",
                "seconds": sample_s,  # unrounded, for the ratio (not a column)
            }
        )
        print(rows[-1], flush=True)

    stats, stats_s, _ = timed(lambda: els.ZooStats.build(train), torch.device("cpu"))
    for kind in args.kinds:
        load = os.getloadavg()[0]
        _, seconds, peak = timed(
            lambda kind=kind: els.sample(
                kind, None, FASHION_RESNET, noise, stats=stats, keys=keys, device=device,
                disable=True,
            ),
            device,
        )  # fmt: skip
        record(kind, stats_s, seconds, peak, load)
    if not args.no_bbels:
        load = os.getloadavg()[0]
        indexes, index_s, _ = timed(
            lambda: els.PatchIndex.build(
                train, "bbels", els.schedule_patch_sizes("bbels", FASHION_RESNET)
            ),
            torch.device("cpu"),
        )
        _, seconds, peak = timed(
            lambda: els.sample(
                "bbels", None, FASHION_RESNET, noise, index=indexes, device=device, disable=True
            ),
            device,
        )
        record("bbels", index_s, seconds, peak, load)
        for row in rows:
            row["ratio_to_bbels"] = f"{row['seconds'] / seconds:.3g}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
