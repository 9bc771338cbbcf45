"""Speed of the patch-machine kernel on FashionMNIST (class 3, all 6000 training images by default)
with the paper's FashionMNIST ResNet (zero padding) schedule, in ONE process, so that every ratio
compares runs made on the same machine under the same load.

- yardstick: the issue's unfused brute force (yardstick.py): one interior bbELS evaluation at k=3 plus
  one at k=17, candidates unfolded once, then per chunk of 400,000 candidates one matrix product and
  one exp per pair.
- baseline (baseline.py): the straightforward exact bbELS (conv2d per query family, streaming softmax),
  per evaluation at the --baseline-ks.
- exact: els.denoise / els.sample with a prebuilt PatchIndex; per evaluation also with provenance
  (exact+n_eff: the effective number of candidates; exact+sources: and each pixel's dominant one).

Writes OUT/NAME_evals.csv (per evaluation: k, t, batch, mode, seconds, per image, ratio to the
baseline, max abs diff to the baseline, peak memory) and OUT/NAME_samples.csv (per full sample:
batch, seconds, per sample, ratio to the yardstick, float32 vs float64 max abs diff, index build
seconds and size, peak memory).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
from benchmarks.baseline import baseline_denoise  # noqa: E402
from benchmarks.yardstick import yardstick_seconds  # noqa: E402
from els.data import load_prepared  # noqa: E402
from els.index import to_float  # noqa: E402
from els.schedule import noise_scale, signal_scale  # noqa: E402

FASHION_RESNET = [3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17]

# the evaluation rows: without provenance; with n_eff alone (every step of a sample with
# provenance); with n_eff and each pixel's dominant candidate (such a sample's last step)
EVAL_MODES = {
    "exact": {},
    "exact+n_eff": {"return_provenance": True, "provenance_sources": False},
    "exact+sources": {"return_provenance": True},
}


class PeakMemory:
    """Peak resident memory (bytes) of this process while the block runs, polled every 5 ms."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def timed(fn):
    with PeakMemory() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak / 2**30


class Writer:
    def __init__(self, path: Path, fields):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=fields)
        self.csv.writeheader()

    def row(self, **values):
        values = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items()}
        self.csv.writerow(values)
        self.file.flush()
        print("  ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def class_arguments(p: argparse.ArgumentParser) -> None:
    """--data (the pipeline's prepared file), --cls, --n-train, --out and --name."""
    p.add_argument("--data", default="results/data/FashionMNIST/train.safetensors")
    p.add_argument("--cls", type=int, default=3)
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--name", default="full")


def load_class(args) -> torch.Tensor:
    """The class's training images (uint8 [N, C, H, W]), the first --n-train of them if given."""
    train, _ = load_prepared(args.data, cls=args.cls)
    return train[: args.n_train] if args.n_train else train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    class_arguments(p)
    p.add_argument("--ks", default="3,11,17", help="patch sizes of the per-evaluation rows")
    p.add_argument("--baseline-ks", default="11,17", help="where the baseline runs per evaluation")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--sample-batches", default="1,8")
    p.add_argument("--evals", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    with torch.no_grad():
        run(args)


def run(args):
    out = Path(args.out)
    train = load_class(args)
    N = train.shape[0]
    ks = [int(k) for k in args.ks.split(",") if k]
    base_ks = {int(k) for k in args.baseline_ks.split(",") if k}
    print(
        f"# {args.name}: FashionMNIST class {args.cls}, N={N}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    n = len(FASHION_RESNET)
    index, build_s, _ = timed(
        lambda: els.PatchIndex.build(
            train, "bbels", els.schedule_patch_sizes("bbels", FASHION_RESNET)
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index.safetensors")
        index_mb = (Path(tmp) / "index.safetensors").stat().st_size / 2**20
    els.denoise(index, torch.zeros(1, *train.shape[1:]), 0.5, 3)  # compiles the kernel once
    gen = torch.Generator().manual_seed(0)
    clean = to_float(train[torch.randint(N, (8,), generator=gen)], torch.float32)
    if args.evals:
        ev = Writer(
            out / f"{args.name}_evals.csv",
            ["k", "t", "batch", "mode", "seconds", "per_image_s", "ratio_to_baseline",
             "max_abs_diff_vs_baseline", "peak_memory_gb"],
        )  # fmt: skip
        for k in ks:
            i = max(j for j in range(1, n) if FASHION_RESNET[j] == k)  # its step at largest t
            t = i / n
            x_all = signal_scale(t) * clean + noise_scale(t) * torch.randn(
                clean.shape, generator=gen
            )
            for B in (int(b) for b in args.batches.split(",")):
                x = x_all[:B]
                els.denoise(index, x, t, k)  # norms for this k
                base = None
                if k in base_ks and B == 1:
                    base, base_sec, base_mem = timed(
                        lambda x=x, t=t, k=k: baseline_denoise(x, t, train, k)
                    )
                    ev.row(k=k, t=t, batch=B, mode="baseline", seconds=base_sec,
                           per_image_s=base_sec / B, ratio_to_baseline=1.0,
                           max_abs_diff_vs_baseline=0.0, peak_memory_gb=base_mem)  # fmt: skip
                    base_per_image = base_sec / B
                elif k not in base_ks:
                    base_per_image = None
                for mode, options in EVAL_MODES.items():
                    result, sec, mem = timed(
                        lambda x=x, t=t, k=k, o=options: els.denoise(index, x, t, k, **o)
                    )
                    m = result[0] if options else result
                    diff = (m - base).abs().max().item() if base is not None else ""
                    ratio = base_per_image / (sec / B) if base_per_image else ""
                    ev.row(k=k, t=t, batch=B, mode=mode, seconds=sec, per_image_s=sec / B,
                           ratio_to_baseline=ratio, max_abs_diff_vs_baseline=diff,
                           peak_memory_gb=mem)  # fmt: skip
    if args.samples:
        yard = yardstick_seconds(train)
        print(f"yardstick: {yard:.1f} s (k=3 + k=17 brute-force interior evaluations)", flush=True)
        sm = Writer(
            out / f"{args.name}_samples.csv",
            ["batch", "seconds", "per_sample_s", "ratio_to_yardstick", "yardstick_s",
             "max_abs_diff_vs_float64", "index_build_s", "index_mb", "class_uint8_mb",
             "peak_memory_gb"],
        )  # fmt: skip
        noise = torch.randn(8, *train.shape[1:], generator=torch.Generator().manual_seed(1))
        reference = els.sample("bbels", None, FASHION_RESNET, noise[:1], index=index,
                               dtype=torch.float64, disable=True)  # fmt: skip
        for B in (int(b) for b in args.sample_batches.split(",")):
            img, sec, mem = timed(
                lambda B=B: els.sample(
                    "bbels", None, FASHION_RESNET, noise[:B], index=index, disable=True
                )  # fmt: skip
            )
            sm.row(batch=B, seconds=sec, per_sample_s=sec / B, ratio_to_yardstick=sec / B / yard,
                   yardstick_s=yard,
                   max_abs_diff_vs_float64=(img[:1].double() - reference).abs().max().item(),
                   index_build_s=build_s, index_mb=index_mb, class_uint8_mb=train.numel() / 2**20,
                   peak_memory_gb=mem)  # fmt: skip


if __name__ == "__main__":
    main()
