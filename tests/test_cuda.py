"""The GPU path: every machine on CUDA against the loop implementation of the spec (float64), a
float32 sample on CUDA against the same sample on the CPU, provenance, batches bitwise equal to single
seeds. These run only where torch sees a CUDA device; the CPU suite runs the same Triton kernel in
Triton's interpreter (tests/test_machines.py, triton_on_cpu). ELS_TEST_DEVICE=cpu runs them on the
CPU (a check of the tests themselves)."""

import os

import pytest
import torch
from reference import random_8bit_images, random_images, ref_denoise, ref_sample

import els

CUDA = torch.device(os.environ.get("ELS_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


def rel_err(actual, expected):
    actual = actual.cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


# ELS needs a fully-inside patch; LS and bbELS also run with k >= the image size (11)
MACHINE_KS = [("ideal", None)] + [(m, k) for m in ("ls", "bbels") for k in (3, 5, 11)]
MACHINE_KS += [("els", 3), ("els", 5)]


@pytest.mark.parametrize("kind,k", MACHINE_KS)
@pytest.mark.parametrize("H,W,C,N", [(7, 7, 1, 4), (8, 10, 3, 3)])
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_machines_on_cuda_match_loop(kind, k, H, W, C, N, t):
    train = random_images(N, C, H, W, seed=1)
    x = random_images(2, C, H, W, seed=2)
    index = els.PatchIndex.build(train, kind, k).to(CUDA)
    m = els.denoise(index, x.to(CUDA), t)
    assert m.device.type == CUDA.type
    assert rel_err(m, ref_denoise(kind, x, t, train, k)) <= 1e-9


@pytest.mark.parametrize("kind", ["els", "bbels"])
@pytest.mark.parametrize("k", [3, 5])
def test_8bit_training_set_on_cuda_matches_loop(kind, k):
    train = random_8bit_images(6, 2, 9, 9, seed=3)
    x = random_images(2, 2, 9, 9, seed=4)
    index = els.PatchIndex.build(train, kind, k).to(CUDA)
    ref = ref_denoise(kind, x, 0.3, els.index.to_float(train, torch.float64), k)
    assert rel_err(els.denoise(index, x.to(CUDA), 0.3), ref) <= 1e-9


def test_sample_on_cuda_matches_loop_and_cpu():
    train = random_images(5, 2, 8, 8, seed=5)
    noise = random_images(2, 2, 8, 8, seed=6)
    scales = [3, 3, 5, 5, 7]
    on_gpu = els.sample("bbels", train, scales, noise, device=CUDA, dtype=torch.float64)
    assert on_gpu.device.type == CUDA.type
    assert rel_err(on_gpu, ref_sample("bbels", train, scales, noise)) <= 1e-9
    # float32: the GPU and the CPU round differently, but not by much
    f32 = els.sample("bbels", train, scales, noise, device=CUDA)
    cpu32 = els.sample("bbels", train, scales, noise)
    assert rel_err(f32, cpu32) <= 1e-4


def test_provenance_on_cuda_equals_cpu():
    train = random_8bit_images(6, 1, 10, 10, seed=7)
    x = random_images(2, 1, 10, 10, seed=8)
    index = els.PatchIndex.build(train, "bbels", 5)
    _, on_cpu = els.denoise(index, x, 0.1, return_provenance=True)
    _, on_gpu = els.denoise(index.to(CUDA), x.to(CUDA), 0.1, return_provenance=True)
    for f in ("image", "row", "col"):
        assert torch.equal(getattr(on_gpu, f).cpu(), getattr(on_cpu, f)), f
    assert rel_err(on_gpu.weight, on_cpu.weight) <= 1e-9


@pytest.mark.parametrize("kind,k", [("bbels", 3), ("bbels", 7), ("els", 5), ("ls", 3)])
def test_float32_batch_on_cuda_is_bitwise_single_images(kind, k):
    train = random_8bit_images(40, 1, 12, 12, seed=9)
    x = random_images(4, 1, 12, 12, seed=10, dtype=torch.float32).to(CUDA)
    index = els.PatchIndex.build(train, kind, k).to(CUDA)
    together = els.denoise(index, x, 0.4)
    for i in range(4):
        assert torch.equal(together[i : i + 1], els.denoise(index, x[i : i + 1], 0.4))
