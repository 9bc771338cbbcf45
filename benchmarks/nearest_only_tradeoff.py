"""What restricting each query to its nearest candidates would buy on a CPU: the certified pruning of
els/blocks.py run with smaller margins, so that each query visits only the candidate blocks whose
logits can come within `margin` of its best (a radius form of top-K, from the block index), in
lockstep with exact mode over one full 19-step sample (FashionMNIST, the paper's ResNet schedule).
Prints and writes the low- and high-noise seconds, and the final image's max abs difference and r^2
against exact mode, per margin. Not a mode of the library: a measurement of its ceiling.

    .venv/bin/python benchmarks/nearest_only_tradeoff.py [--cls 3] [--extras 30,0,-10,-15]

`--extras` are the added margins: margin = log M + extra (exact mode's is extra = 30, which bounds the
skipped weight by e^-30 of the total; smaller extras skip more and bound nothing).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
import els.blocks  # noqa: E402
from benchmarks.run_benchmark import FASHION_RESNET, r_squared  # noqa: E402
from els.data import load_prepared  # noqa: E402
from els.schedule import noise_scale, reverse_steps, signal_scale  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/tmp/fm/train.safetensors", help="prepared FashionMNIST")
    p.add_argument("--cls", type=int, default=3)
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--extras", default="30,0,-10,-15")
    p.add_argument("--out", default="results/benchmarks/nearest_only.csv")
    args = p.parse_args(argv)
    extras = [float(e) for e in args.extras.split(",")]
    if extras[0] != els.blocks.EXTRA_MARGIN:
        extras.insert(0, els.blocks.EXTRA_MARGIN)  # exact mode: the reference
    train, _ = load_prepared(args.data, cls=args.cls)
    if args.n_train:
        train = train[: args.n_train]
    indexes = els.build_indexes("bbels", train, FASHION_RESNET)
    noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    for k in sorted(set(FASHION_RESNET[1:])):  # candidate blocks built before the clock runs
        els.denoise(indexes[k], noise, 0.05)
    xs = dict.fromkeys(extras, noise)
    low, high = dict.fromkeys(extras, 0.0), dict.fromkeys(extras, 0.0)
    exact_margin = els.blocks.EXTRA_MARGIN
    try:
        with torch.no_grad():
            for i, t, t_next in reverse_steps(len(FASHION_RESNET)):
                k = FASHION_RESNET[i]
                a, b = signal_scale(t), noise_scale(t)
                ratio = signal_scale(t_next) / a
                for extra in extras:  # lockstep: load drifts hit every margin alike
                    els.blocks.EXTRA_MARGIN = extra
                    t0 = time.perf_counter()
                    m = els.denoise(indexes[k], xs[extra], t)
                    dt = time.perf_counter() - t0
                    if t <= els.machines.PRUNE_BELOW_T:
                        low[extra] += dt
                    else:
                        high[extra] += dt
                    eps = (xs[extra] - a * m) / b
                    xs[extra] = ratio * xs[extra] + (noise_scale(t_next) - ratio * b) * eps
    finally:
        els.blocks.EXTRA_MARGIN = exact_margin
    exact = xs[exact_margin]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cls", "seed", "extra", "low_noise_s", "high_noise_s", "max_abs_diff", "r2"])
        for extra in extras:
            diff = (xs[extra] - exact).abs().max().item()
            r2 = r_squared(xs[extra], exact)
            w.writerow([args.cls, args.seed, extra, low[extra], high[extra], diff, r2])
            print(
                f"extra={extra:g}: low-noise steps {low[extra]:.1f} s, high-noise {high[extra]:.1f} s,"
                f" max abs diff {diff:.2e}, r2 {r2:.7f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
