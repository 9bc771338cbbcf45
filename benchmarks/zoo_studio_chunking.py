"""What the Analytic Diffusion Studio's per-chunk softmax does to pca_locality, measured: one
denoising step on real FashionMNIST (class 3, all 6000 training images) at a few t, with the
softmax over all candidates (els.zoo, ZOO_SPEC.md) and with the Studio's variant -- a separate
softmax inside each loader chunk of 512 images (dataset order), the chunk results averaged with
equal weight (the 368-image tail chunk weighs as much as a full one).

    .venv/bin/python benchmarks/zoo_studio_chunking.py [--queries 4] [--t 0.9 0.7 0.5 0.3 0.1]

Queries: x_t = a_t phi + b_t eps for the class's first training images phi (eps from the project's
noise, seeds 0..). Writes results/benchmarks/zoo_studio_chunking.csv: per t the relative difference
max|m_chunked - m_global| / max|m_global| and ||m_chunked - m_global|| / ||m_global||, the largest over
the queries.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
from benchmarks.zoo_benchmark import training_images  # noqa: E402
from els.noise import noise_for  # noqa: E402
from els.schedule import noise_scale, signal_scale  # noqa: E402
from els.zoo.machines import PARAMETERS, pca_locality_fold  # noqa: E402

STUDIO_CHUNK = 512


def chunked_mean(q, images, mask, a, scale, chunk):
    """The Studio's variant: a softmax per chunk of `chunk` images, chunk means averaged equally."""
    parts = [
        pca_locality_fold(q, images[s : s + chunk], mask, a, scale, images.shape[0], False)[0]
        for s in range(0, images.shape[0], chunk)
    ]
    return torch.stack(parts).mean(dim=0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("results/benchmarks/data/train.safetensors"))
    p.add_argument("--cls", type=int, default=3)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--t", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1])
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--out", type=Path, default=Path("results/benchmarks/zoo_studio_chunking.csv"))
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    train = training_images(args.data, args.cls, None)
    stats = els.ZooStats.build(train)
    images = stats.float_images(dtype, "cpu")
    params = PARAMETERS["pca_locality"]
    rows = []
    for t in args.t:
        a, b = signal_scale(t), noise_scale(t)
        mask = stats.mask(a, b * b, params["mask_threshold"]).to(dtype)
        scale = 1.0 / (2.0 * b * b * params["temperature"])
        worst_max = worst_l2 = 0.0
        for i in range(args.queries):
            eps = noise_for("FashionMNIST", args.cls, i, train.shape[1:]).reshape(-1).to(dtype)
            q = a * images[i] + b * eps
            whole = pca_locality_fold(q, images, mask, a, scale, images.shape[0], False)[0]
            studio = chunked_mean(q, images, mask, a, scale, STUDIO_CHUNK)
            diff = studio - whole
            worst_max = max(worst_max, float(diff.abs().max() / whole.abs().max()))
            worst_l2 = max(worst_l2, float(diff.norm() / whole.norm()))
        per_column = float(mask.sum(dim=0).median())
        rows.append(
            {
                "t": t,
                "n_train": train.shape[0],
                "queries": args.queries,
                "chunk": STUDIO_CHUNK,
                "mask_median_entries_per_column": per_column,
                "rel_max_diff": f"{worst_max:.4g}",
                "rel_l2_diff": f"{worst_l2:.4g}",
            }
        )
        print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
