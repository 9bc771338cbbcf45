"""Speed of the patch machines' GPU kernel (els/triton_kernel.py) on FashionMNIST: full exact bbELS
samples (class 3, all 6000 training images by default, the paper's FashionMNIST ResNet schedule,
float32) on a CUDA device, after one warm-up sample that compiles the kernels.

Writes OUT/NAME_gpu_samples.csv: device name, batch, seconds, per sample, the max abs difference of
seed 0 to the CPU kernel's float32 sample of the same noise, torch and triton versions.

    .venv/bin/python benchmarks/gpu_benchmark.py --data results/data/FashionMNIST/train.safetensors
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import els  # noqa: E402
from benchmarks.run_benchmark import (  # noqa: E402
    FASHION_RESNET,
    Writer,
    class_arguments,
    load_class,
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    class_arguments(p)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    with torch.no_grad():
        run(args)


def run(args):
    import triton

    device = torch.device(args.device)
    train = load_class(args)
    index = els.PatchIndex.build(train, "bbels", els.schedule_patch_sizes("bbels", FASHION_RESNET))
    batches = [int(b) for b in args.batches.split(",") if b]
    noise = torch.randn(max(batches), *train.shape[1:], generator=torch.Generator().manual_seed(1))
    on_cpu = els.sample("bbels", None, FASHION_RESNET, noise[:1], index=index, disable=True)
    name = device_name(device)
    print(f"# {args.name}: FashionMNIST class {args.cls}, N={train.shape[0]}, {name}", flush=True)
    table = Writer(
        Path(args.out) / f"{args.name}_gpu_samples.csv",
        ["device", "batch", "seconds", "per_sample_s", "max_abs_diff_vs_cpu", "torch", "triton"],
    )
    els.sample("bbels", None, FASHION_RESNET, noise[:1], index=index, device=device, disable=True)
    for B in batches:
        synchronize(device)
        start = time.perf_counter()
        images = els.sample(
            "bbels", None, FASHION_RESNET, noise[:B], index=index, device=device, disable=True
        )
        synchronize(device)
        seconds = time.perf_counter() - start
        table.row(
            device=name,
            batch=B,
            seconds=seconds,
            per_sample_s=seconds / B,
            max_abs_diff_vs_cpu=(images[:1].cpu() - on_cpu).abs().max().item(),
            torch=torch.__version__,
            triton=triton.__version__,
        )


if __name__ == "__main__":
    main()
