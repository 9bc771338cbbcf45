"""GPU probe of the fused fold (els.fused): per score evaluation on FashionMNIST class 3 (all 6000
images), the fused kernels at several block configurations against the torch fold (ELS_FUSED=0):
seconds and max abs difference. For choosing els.fused's block sizes on a lent GPU; the benchmark
proper is run_benchmark.py.

    python3 benchmarks/gpu_fused_probe.py DATA OUT.csv
"""

from __future__ import annotations

import csv
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
from els import fused  # noqa: E402
from els.data import load_prepared  # noqa: E402
from els.schedule import noise_scale, signal_scale  # noqa: E402

CASES = [(3, 0.1), (11, 0.55), (17, 0.95)]
CONFIGS = [  # BLOCK_M, BLOCK_N, SPLIT, warps
    (64, 64, 16384, 4),
    (32, 64, 16384, 4),
    (128, 64, 16384, 8),
    (64, 64, 4096, 4),
]


def timed(fn, reps=2):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main():
    data, out = sys.argv[1], sys.argv[2]
    train, _ = load_prepared(data, cls=3)
    dev = torch.device("cuda")
    rows = []
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["k", "t", "batch", "config", "seconds", "max_abs_diff_vs_torch_fold"])
        indexes = {}
        for (k, t), B in itertools.product(CASES, (1, 8)):
            if k not in indexes:
                indexes.clear()
                indexes[k] = els.PatchIndex.build(train, "bbels", k, blocks=False).to(dev)
            index = indexes[k]
            g = torch.Generator().manual_seed(k)
            clean = els.index.to_float(train[torch.randint(6000, (B,), generator=g)], torch.float32)
            a, b = signal_scale(t), noise_scale(t)
            x = (a * clean + b * torch.randn(clean.shape, generator=g)).to(dev)
            os.environ["ELS_FUSED"] = "0"
            ref, dt = timed(lambda index=index, x=x, t=t: els.denoise(index, x, t))
            w.writerow([k, t, B, "torch_fold", dt, 0.0])
            print(f"k={k} B={B} torch fold {dt * 1e3:.1f} ms", flush=True)
            os.environ["ELS_FUSED"] = "1"
            for cfg in CONFIGS:
                fused.BLOCK_M, fused.BLOCK_N, fused.SPLIT, fused.NUM_WARPS = cfg
                try:
                    m, dt = timed(lambda index=index, x=x, t=t: els.denoise(index, x, t))
                    diff = (m - ref).abs().max().item()
                except Exception as err:  # a configuration the GPU cannot run: say so, go on
                    dt, diff = float("nan"), repr(err)[:200]
                w.writerow([k, t, B, "x".join(map(str, cfg)), dt, diff])
                f.flush()
                print(f"k={k} B={B} fused {cfg}: {dt * 1e3:.1f} ms, diff {diff}", flush=True)
                rows.append((k, B, cfg, dt))
    best = {}
    for _k, _b, cfg, dt in rows:
        best.setdefault(cfg, 0.0)
        best[cfg] += dt
    for cfg, total in sorted(best.items(), key=lambda kv: kv[1]):
        print(f"config {cfg}: total {total * 1e3:.1f} ms over the cases", flush=True)


if __name__ == "__main__":
    main()
