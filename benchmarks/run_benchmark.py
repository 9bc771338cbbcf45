"""Benchmark of bbELS sampling: the straightforward baseline (benchmarks/baseline.py), the library's
exact mode and its fast mode, in ONE process on the same machine (ratios are what to compare: the
cores may be shared). See benchmarks/README.md.

    .venv/bin/python benchmarks/run_benchmark.py            # full: FashionMNIST class 3, N = 6000
    .venv/bin/python benchmarks/run_benchmark.py --quick    # smoke version: N = 200, 2 samples for r^2
    python3 benchmarks/run_benchmark.py --device cuda       # everything on a GPU (benchmarks/gpu_run.sh)

Writes results/benchmarks/<name>_evals.csv, _samples.csv, _r2.csv (rows appended as they finish).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
from benchmarks.baseline import baseline_denoise  # noqa: E402
from els.data import load_prepared  # noqa: E402
from els.schedule import noise_scale, reverse_steps, signal_scale  # noqa: E402

# FashionMNIST, ResNet, zero padding, conditional (published_scales.csv): the paper's schedule
FASHION_RESNET = [3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17]


class PeakRSS:
    """Peak resident memory of this process while the block runs (polls /proc every 5 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
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


DEVICE = torch.device("cpu")  # set by --device


def timed(fn):
    """fn's result, wall seconds and peak memory in GB: resident memory of this process on a CPU, the
    GPU memory allocated by torch on a GPU (device work is waited for before the clock stops)."""
    gpu = DEVICE.type == "cuda"
    if gpu:
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        if gpu:
            torch.cuda.synchronize(DEVICE)
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(DEVICE) if gpu else mem.peak
    return out, dt, peak / 2**30


class Writer:
    def __init__(self, path: Path, fields):
        self.path, self.fields = path, fields
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(fields)

    def row(self, **values):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([values.get(k, "") for k in self.fields])
        print(" ".join(f"{k}={_fmt(values.get(k, ''))}" for k in self.fields), flush=True)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SSE / SST of pred against target, over all pixels of all images."""
    pred, target = pred.double().flatten(), target.double().flatten()
    sst = (target - target.mean()).square().sum()
    return float(1 - (pred - target).square().sum() / sst)


@contextlib.contextmanager
def torch_fold():
    """On a GPU: the exact mode without els.fused's kernels (the torch fold), for comparison."""
    old = os.environ.get("ELS_FUSED")
    os.environ["ELS_FUSED"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ELS_FUSED"]
        else:
            os.environ["ELS_FUSED"] = old


def with_torch_fold(fn):
    def call(*args):
        with torch_fold():
            return fn(*args)

    return call


def one_index_at_a_time(index_for, budget):
    """A denoiser (x, t, k) over per-step indexes that, as els.sample does, releases the previous
    index's explicit candidates (candidate blocks) when the index changes."""
    current = {}

    def denoise(x, t, k):
        idx = index_for(t, k)
        if current.get("index") is not idx:
            if current.get("index") is not None:
                current["index"].release()
            current["index"] = idx
        return els.denoise(idx, x, t, memory_budget=budget)

    return denoise


def lockstep_samples(noise: torch.Tensor, denoisers: dict):
    """The spec's reverse process (els.sampler.sample_reverse's steps) for several denoisers in
    lockstep: at every step each mode denoises its own x in turn, so that slow drifts in the load of a
    shared machine hit every mode alike. Returns the final images, the seconds spent in each mode's
    denoiser (the step arithmetic is negligible) and each peak memory (GB; see timed)."""
    n = len(FASHION_RESNET)
    xs = dict.fromkeys(denoisers, noise)
    seconds = dict.fromkeys(denoisers, 0.0)
    peak = dict.fromkeys(denoisers, 0.0)
    for i, t, t_next in reverse_steps(n):
        k = FASHION_RESNET[i]
        a, b = signal_scale(t), noise_scale(t)
        ratio = signal_scale(t_next) / a
        for mode, denoise in denoisers.items():
            x = xs[mode]
            m, dt, mem = timed(lambda denoise=denoise, x=x, t=t, k=k: denoise(x, t, k))
            seconds[mode] += dt
            peak[mode] = max(peak[mode], mem)
            eps = (x - a * m) / b
            xs[mode] = ratio * x + (noise_scale(t_next) - ratio * b) * eps
        print(
            f"# step i={i} k={k}: " + " ".join(f"{m}={s:.1f}s" for m, s in seconds.items()),
            flush=True,
        )
    return xs, seconds, peak


def main(argv=None):
    # a caller's grad mode and TF32 flags are left as they were (set_grad_enabled(False) was not)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        with torch.no_grad():
            _main(argv)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default="/tmp/fm/train.safetensors", help="prepared FashionMNIST")
    p.add_argument("--cls", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small smoke version (N=200)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    p.add_argument("--ks", default="3,11,17")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--evals", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--baseline-batch8-ks",
        default="11,17",
        help="patch sizes at which the baseline's evaluation also runs at batch 8 (at k=3 it takes "
        "about half an hour on 2 cores); elsewhere batch-8 ratios use the baseline's batch-1 time "
        "per image",
    )
    p.add_argument(
        "--baseline-batch8-sample",
        action="store_true",
        help="also run the baseline's full sample at B=8 (hours at N=6000)",
    )
    p.add_argument(
        "--sample-modes",
        default="baseline,exact,fast,exact_torch_fold",
        help="modes of the full samples (exact_torch_fold: GPU only); the baseline runs at B=1 "
        "(and at B=8 with --baseline-batch8-sample)",
    )
    p.add_argument("--r2-classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--r2-seeds", type=int, default=2, help="seeds per class for fast-mode r^2")
    p.add_argument("--fast-fraction", type=float, default=0.25)
    p.add_argument(
        "--r2-fractions",
        default=None,
        help="fast-mode training fractions for the speed/r^2 trade-off (default: --fast-fraction)",
    )
    p.add_argument("--fast-exact-below", type=float, default=0.0)
    p.add_argument("--memory-budget-gb", type=float, default=8.0)
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu or cuda: where every mode (the baseline included) runs; indexes are built on the "
        "CPU as the pipeline builds them, without block plans on a GPU (pruning is CPU-only)",
    )
    p.add_argument("--out", default="results/benchmarks")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train = args.n_train or 200
        args.r2_classes, args.r2_seeds = "0,3", 1
        args.baseline_batch8_ks = ",".join(args.ks.split(","))
    name = args.name or ("quick" if args.quick else "full")
    out = Path(args.out)
    budget = int(args.memory_budget_gb * 2**30)
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    base8_ks = {int(k) for k in args.baseline_batch8_ks.split(",") if k}
    fractions = [float(f) for f in (args.r2_fractions or str(args.fast_fraction)).split(",")]
    global DEVICE
    DEVICE = torch.device(args.device)
    gpu = DEVICE.type == "cuda"
    plans = "auto" if not gpu else False  # block plans serve CPU pruning only
    if gpu:
        # the yardstick in IEEE float32 too (cuDNN's convolutions default to TF32, ~1e-3 relative)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    train, _ = load_prepared(args.data, cls=args.cls)
    if args.n_train:
        train = train[: args.n_train]
    N = train.shape[0]
    train_dev = train.to(DEVICE)  # the baseline reads its training images where it runs
    load = os.getloadavg()
    where = torch.cuda.get_device_name(DEVICE) if gpu else f"cpus {sorted(os.sched_getaffinity(0))}"
    print(
        f"# {name}: FashionMNIST class {args.cls}, N={N}, torch {torch.__version__}, "
        f"device {DEVICE} ({where}), threads {torch.get_num_threads()}, "
        f"load {load[0]:.2f}, budget {args.memory_budget_gb} GB, compiled fold "
        f"{'on' if not gpu and els.native.fold_module() is not None else 'off'}, fused fold "
        f"{'on' if gpu and els.fused.usable(train_dev.float(), 1) else 'off'}",
        flush=True,
    )
    n = len(FASHION_RESNET)
    if gpu:
        # CUDA context, cuBLAS/cuDNN handles and kernels' first loads stay out of the timings
        # (and the fused fold's Triton kernels compiled for every patch size used)
        warm = els.index.to_float(train[:2], torch.float32).to(DEVICE)
        for k in (3, 5):
            baseline_denoise(warm, 0.5, train_dev[:64], k)
        for k in sorted(set(FASHION_RESNET[1:]) | set(ks)):
            small = els.PatchIndex.build(train[:64], "bbels", k, blocks=False).to(DEVICE)
            els.denoise(small, warm, 0.5)
        torch.cuda.synchronize(DEVICE)

    # ------------------------------------------------------------------ per score evaluation
    if args.evals:
        ev = Writer(
            out / f"{name}_evals.csv",
            [
                "k",
                "t",
                "batch",
                "mode",
                "seconds",
                "per_image_s",
                "ratio_to_baseline",
                "baseline_batch",
                "max_abs_diff_vs_baseline",
                "peak_memory_gb",
                "build_s",
                "load1",
            ],
        )
        for k in ks:
            i = max(
                j for j in range(1, n) if FASHION_RESNET[j] == k
            )  # the step using k at largest t
            t = i / n
            a, b = signal_scale(t), noise_scale(t)
            index, build_s, _ = timed(
                lambda k=k: els.PatchIndex.build(train, "bbels", k, blocks=plans)
            )
            fast_n = max(1, math.ceil(args.fast_fraction * N))
            subset = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:fast_n]
            subset = subset.sort().values  # the subset els.sample(mode='fast') uses (fast_seed=0)
            fast_index, fast_build_s, _ = timed(
                lambda k=k, s=subset: els.PatchIndex.build(train[s], "bbels", k, blocks=False)
            )
            index, fast_index = index.to(DEVICE), fast_index.to(DEVICE)
            base_per_image = None  # the baseline's batch-1 seconds per image, for batches it skips
            for B in batches:
                g = torch.Generator().manual_seed(100 + B)
                clean = els.index.to_float(
                    train[torch.randint(N, (B,), generator=g)], torch.float32
                )
                x = (a * clean + b * torch.randn(clean.shape, generator=g)).to(DEVICE)
                mb, base_b = None, B
                if B == 1 or k in base8_ks or base_per_image is None:
                    mb, tb, mem_b = timed(
                        lambda x=x, t=t, k=k: baseline_denoise(x, t, train_dev, k)
                    )
                    base_per_image = tb / B if B == 1 else base_per_image
                    ev.row(
                        k=k,
                        t=t,
                        batch=B,
                        mode="baseline",
                        seconds=tb,
                        per_image_s=tb / B,
                        ratio_to_baseline=1.0,
                        baseline_batch=B,
                        max_abs_diff_vs_baseline=0.0,
                        peak_memory_gb=mem_b,
                        load1=os.getloadavg()[0],
                    )
                else:
                    tb, base_b = base_per_image * B, 1
                modes = [("exact", index, build_s), ("fast", fast_index, fast_build_s)]
                if gpu:
                    modes.append(("exact_torch_fold", index, build_s))
                for mode, idx, bs in modes:
                    fold = torch_fold() if mode == "exact_torch_fold" else contextlib.nullcontext()
                    with fold:
                        m, dt, mem = timed(
                            lambda idx=idx, x=x, t=t: els.denoise(idx, x, t, memory_budget=budget)
                        )
                    if mode == "exact" and mb is None:
                        mb = m  # no baseline at this batch: differences against exact mode
                    ev.row(
                        k=k,
                        t=t,
                        batch=B,
                        mode=mode,
                        seconds=dt,
                        per_image_s=dt / B,
                        ratio_to_baseline=tb / dt,
                        baseline_batch=base_b,
                        max_abs_diff_vs_baseline=(m - mb).abs().max().item() if base_b == B else "",
                        peak_memory_gb=mem,
                        build_s=bs,
                        load1=os.getloadavg()[0],
                    )
            del index, fast_index

    # ------------------------------------------------------------------ full 19-step samples
    sample_modes = set(args.sample_modes.split(","))
    if args.samples:
        sp = Writer(
            out / f"{name}_samples.csv",
            [
                "batch",
                "mode",
                "seconds",
                "per_sample_s",
                "ratio_to_baseline",
                "max_abs_diff_vs_baseline",
                "max_abs_diff_vs_exact",
                "r2_vs_exact",
                "peak_memory_gb",
                "build_s",
                "load1",
            ],
        )
        indexes, build_s, _ = timed(
            lambda: els.build_indexes("bbels", train, FASHION_RESNET, blocks=plans)
        )
        print(f"# index build for k={sorted(indexes)}: {build_s:.1f} s", flush=True)
        fast_n = max(1, math.ceil(args.fast_fraction * N))
        subset = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:fast_n]
        subset = subset.sort().values  # the subset els.sample(mode='fast') uses (fast_seed=0)
        fast_indexes, fast_build_s = {}, ""
        if "fast" in sample_modes:
            fast_indexes, fast_build_s, _ = timed(
                lambda: els.build_indexes("bbels", train[subset], FASHION_RESNET, blocks=False)
            )
        indexes = {k: v.to(DEVICE) for k, v in indexes.items()}
        fast_indexes = {k: v.to(DEVICE) for k, v in fast_indexes.items()}
        fast_or_exact = {
            k: (fast_indexes.get(k), indexes[k]) for k in indexes
        }  # (t >= fast_exact_below, below)
        denoisers = {
            "baseline": lambda x, t, k: baseline_denoise(x, t, train_dev, k),
            "exact": one_index_at_a_time(lambda t, k: indexes[k], budget),
            "fast": one_index_at_a_time(
                lambda t, k: fast_or_exact[k][0 if t >= args.fast_exact_below else 1], budget
            ),
        }
        builds = {"baseline": "", "exact": build_s, "fast": fast_build_s}
        if gpu:  # the exact mode without the fused kernels, for comparison
            denoisers["exact_torch_fold"] = with_torch_fold(denoisers["exact"])
            builds["exact_torch_fold"] = build_s
        for B in batches:
            noise = torch.randn(B, 1, 32, 32, generator=torch.Generator().manual_seed(B))
            noise = noise.to(DEVICE)
            modes = ["exact", "fast"] + (["exact_torch_fold"] if gpu else [])
            if B == 1 or args.baseline_batch8_sample:
                modes.insert(0, "baseline")
            modes = [m for m in modes if m in sample_modes]
            final, seconds, peak = lockstep_samples(noise, {m: denoisers[m] for m in modes})
            if B == 1:
                # the lockstep loop is els.sample's: its exact image is els.sample's, bit for bit
                check = els.sample(
                    "bbels",
                    train,
                    FASHION_RESNET,
                    noise,
                    indexes=indexes,
                    memory_budget=budget,
                    disable=True,
                )
                same = torch.equal(check, final["exact"])
                print(f"# lockstep exact == els.sample bit for bit: {same}", flush=True)
                assert same or gpu, "lockstep exact != els.sample"
            exact = final["exact"]
            base = final.get("baseline")
            for mode in modes:
                x = final[mode]
                row = dict(
                    batch=B,
                    mode=mode,
                    seconds=seconds[mode],
                    per_sample_s=seconds[mode] / B,
                    max_abs_diff_vs_exact=(x - exact).abs().max().item(),
                    r2_vs_exact=r_squared(x, exact),
                    peak_memory_gb=peak[mode],
                    build_s=builds[mode],
                    load1=os.getloadavg()[0],
                )
                if base is not None:
                    row.update(
                        ratio_to_baseline=seconds["baseline"] / seconds[mode],
                        max_abs_diff_vs_baseline=(x - base).abs().max().item(),
                    )
                sp.row(**row)
        del indexes

    # ------------------------------------------------------------------ fast-mode r^2 across classes
    classes = [int(c) for c in args.r2_classes.split(",") if c != ""]
    if classes:
        # exact mode once per class, fast mode at each fraction: the speed / r^2 trade-off
        rw = Writer(
            out / f"{name}_r2.csv",
            [
                "cls",
                "seeds",
                "fast_fraction",
                "exact_s",
                "fast_s",
                "speedup",
                "r2_vs_exact",
                "max_abs_diff",
            ],
        )
        exact_all, fast_all = [], {f: [] for f in fractions}
        exact_time, fast_time = 0.0, dict.fromkeys(fractions, 0.0)
        for c in classes:
            tr, _ = load_prepared(args.data, cls=c)
            if args.n_train:
                tr = tr[: args.n_train]
            noise = torch.randn(
                args.r2_seeds, 1, 32, 32, generator=torch.Generator().manual_seed(1000 + c)
            ).to(DEVICE)
            idx = els.build_indexes("bbels", tr, FASHION_RESNET, blocks=plans)
            run = lambda tr=tr, noise=noise, idx=idx, **opts: els.sample(  # noqa: E731
                "bbels",
                tr,
                FASHION_RESNET,
                noise,
                indexes=idx,
                memory_budget=budget,
                disable=True,
                **opts,
            )
            ex, te, _ = timed(run)
            exact_all.append(ex)
            exact_time += te
            for f in fractions:
                opts = dict(mode="fast", fast_fraction=f, fast_exact_below=args.fast_exact_below)
                fa, tf, _ = timed(lambda opts=opts, run=run: run(**opts))
                fast_all[f].append(fa)
                fast_time[f] += tf
                rw.row(
                    cls=c,
                    seeds=args.r2_seeds,
                    fast_fraction=f,
                    exact_s=te,
                    fast_s=tf,
                    speedup=te / tf,
                    r2_vs_exact=r_squared(fa, ex),
                    max_abs_diff=(fa - ex).abs().max().item(),
                )
        exact_cat = torch.cat(exact_all)
        for f in fractions:
            fast_cat = torch.cat(fast_all[f])
            rw.row(
                cls="all",
                seeds=args.r2_seeds * len(classes),
                fast_fraction=f,
                exact_s=exact_time,
                fast_s=fast_time[f],
                speedup=exact_time / fast_time[f],
                r2_vs_exact=r_squared(fast_cat, exact_cat),
                max_abs_diff=(fast_cat - exact_cat).abs().max().item(),
            )
    print(f"# wrote {out}/{name}_*.csv", flush=True)


if __name__ == "__main__":
    main()
