"""The GPU path: every machine on CUDA against the loop implementation of the spec (float64), a
float32 sample on CUDA against the same sample on the CPU, provenance, batches bitwise equal to single
seeds. These run only where torch sees a CUDA device (benchmarks/gpu_run.sh runs them on a lent GPU);
the CPU suite covers the same arithmetic on the CPU. ELS_TEST_DEVICE=cpu runs them on the CPU (a check
of the tests themselves)."""

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
def test_8bit_dedup_on_cuda_matches_loop(kind, k):
    train = random_8bit_images(6, 2, 9, 9, seed=3)
    x = random_images(2, 2, 9, 9, seed=4)
    index = els.PatchIndex.build(train, kind, k, dedup=True).to(CUDA)
    assert any(f.unique is not None for f in index.families)
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
    _, on_cpu = els.denoise(index, x, 0.1, return_provenance=True, prune_below_t=0)
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


# ----------------------------------------------------------------------------- the fused fold
# float32 on CUDA runs els.fused's Triton kernels; ELS_FUSED=0 gives the torch fold they replace
FUSED_CASES = [("els", 3), ("ls", 3), ("bbels", 3), ("bbels", 7), ("bbels", 17)]


def _fused_and_torch(monkeypatch, index, x, t, provenance):
    monkeypatch.setenv("ELS_FUSED", "1")
    fused_out = els.denoise(index, x, t, return_provenance=provenance)
    monkeypatch.setenv("ELS_FUSED", "0")
    torch_out = els.denoise(index, x, t, return_provenance=provenance)
    monkeypatch.setenv("ELS_FUSED", "1")
    return fused_out, torch_out


@pytest.mark.skipif(CUDA.type != "cuda", reason="the fused fold is CUDA-only")
def test_fused_fold_is_used_on_cuda_float32():
    assert els.fused.usable(torch.zeros(1, device=CUDA), 1)
    assert not els.fused.usable(torch.zeros(1, device=CUDA, dtype=torch.float64), 1)


@pytest.mark.parametrize("kind,k", FUSED_CASES)
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_fused_fold_on_cuda_matches_torch_fold(monkeypatch, kind, k, t):
    # 8-bit images: deduplicated candidates (multiplicities, padding) at small k; 18 x 18 leaves
    # an interior at k = 17
    train = random_8bit_images(60, 1, 18, 18, seed=11)
    x = random_images(3, 1, 18, 18, seed=12, dtype=torch.float32).to(CUDA)
    index = els.PatchIndex.build(train, kind, k).to(CUDA)
    (m, prov), (m_torch, prov_torch) = _fused_and_torch(monkeypatch, index, x, t, True)
    assert rel_err(m, m_torch.cpu()) <= 2e-5
    for f in ("image", "row", "col"):  # the dominant patch: ties go to the first occurrence
        same = (getattr(prov, f) == getattr(prov_torch, f)).float().mean().item()
        assert same >= 0.99, f  # float32 rounding may reorder near-ties only
    torch.testing.assert_close(prov.weight, prov_torch.weight, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(prov.n_eff, prov_torch.n_eff, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind,k", FUSED_CASES)
def test_fused_fold_on_cuda_matches_loop(kind, k):
    train = random_8bit_images(3, 1, 18, 18, seed=15)  # few images: the loop is slow
    x = random_images(2, 1, 18, 18, seed=16, dtype=torch.float32)
    index = els.PatchIndex.build(train, kind, k).to(CUDA)
    m = els.denoise(index, x.to(CUDA), 0.5)
    ref = ref_denoise(kind, x.double(), 0.5, els.index.to_float(train, torch.float64), k)
    assert rel_err(m, ref) <= 1e-5


@pytest.mark.parametrize("kind,k", FUSED_CASES)
def test_fused_fold_batch_on_cuda_is_bitwise_single_images(kind, k):
    train = random_8bit_images(60, 1, 18, 18, seed=13)
    x = random_images(5, 1, 18, 18, seed=14, dtype=torch.float32).to(CUDA)
    index = els.PatchIndex.build(train, kind, k).to(CUDA)
    together, prov = els.denoise(index, x, 0.2, return_provenance=True)
    for i in range(5):
        alone, prov_alone = els.denoise(index, x[i : i + 1], 0.2, return_provenance=True)
        assert torch.equal(together[i : i + 1], alone)
        assert torch.equal(prov.image[i : i + 1], prov_alone.image)
        assert torch.equal(prov.weight[i : i + 1], prov_alone.weight)
