"""The optional paths of the core against the loop implementation (tests/reference.py), float64:
materialised (explicit, centred) candidates and the opt-in fast mode of els.sample."""

import math

import pytest
import torch
from reference import random_8bit_images, random_images, ref_denoise, ref_sample

import els
from els.index import to_float


def assert_close(actual, expected, rtol=1e-9):
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize(
    "kind,k,H,W,C",
    [
        ("ideal", None, 6, 6, 1),
        ("ls", 3, 6, 7, 3),
        ("els", 5, 7, 7, 1),
        ("bbels", 3, 7, 7, 1),
        ("bbels", 5, 8, 10, 3),
        ("bbels", 9, 7, 7, 1),  # k >= image size: LS
    ],
)
@pytest.mark.parametrize("t", [0.05, 0.5, 0.95])
def test_materialized_candidates_match_loop(kind, k, H, W, C, t):
    train = random_images(4, C, H, W, seed=1)
    x = random_images(2, C, H, W, seed=2)
    index = els.PatchIndex.build(train, kind, k)
    index.materialize(torch.float64, "cpu")
    for budget in (1, None):  # one candidate per chunk, and the default
        assert_close(
            els.denoise(index, x, t, memory_budget=budget), ref_denoise(kind, x, t, train, k)
        )
    index.release()
    assert index.materialized(index.families[0]) is None


@pytest.mark.parametrize("kind,k", [("els", 3), ("bbels", 3), ("bbels", 5)])
def test_materialized_dedup_and_provenance_match_loop(kind, k):
    train8 = random_8bit_images(5, 1, 8, 8, seed=3)
    train = to_float(train8, torch.float64)
    x = random_images(2, 1, 8, 8, seed=4)
    plain = els.PatchIndex.build(train8, kind, k, dedup=True)
    index = els.PatchIndex.build(train8, kind, k, dedup=True)
    index.materialize(torch.float64, "cpu")
    for t in (0.1, 0.7):
        m, prov = els.denoise(index, x, t, return_provenance=True)
        assert_close(m, ref_denoise(kind, x, t, train, k))
        _, p0 = els.denoise(plain, x, t, return_provenance=True)
        torch.testing.assert_close(prov.weight, p0.weight)
        torch.testing.assert_close(prov.n_eff, p0.n_eff)


def test_materialized_float32_is_accurate():
    # centring keeps the float32 logits small: the error against float64 stays at float32 rounding
    train8 = random_8bit_images(20, 1, 10, 10, seed=5)
    x = random_images(1, 1, 10, 10, seed=6)
    exact = ref_denoise("bbels", x, 0.05, to_float(train8, torch.float64), 3)
    index = els.PatchIndex.build(train8, "bbels", 3)
    index.materialize(torch.float32, "cpu")
    # prune_below_t=0: the materialised chunks, not the candidate blocks (tests/test_blocks.py)
    got = els.denoise(index, x.float(), 0.05, prune_below_t=0)
    # at t = 0.05 the logits' float32 rounding alone moves near-tied pixels by 1e-5-1e-4 (measured
    # 0.9-2.1e-5 here with the torch and the compiled fold); without centring it is ~1e-3
    assert (got.double() - exact).abs().max().item() < 5e-5


def test_sample_with_materialize_matches_loop():
    train = random_images(4, 1, 7, 7, seed=7)
    noise = torch.randn(2, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    scales = [3, 3, 5, 5, 3]
    got = els.sample(
        "bbels", train, scales, noise, dtype=torch.float64, materialize=True, disable=True
    )
    assert_close(got, ref_sample("bbels", train, scales, noise))


def test_fast_mode_is_the_exact_machine_on_its_subset():
    train = random_images(6, 1, 7, 7, seed=9)
    noise = torch.randn(
        1, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10)
    )
    scales = [3, 3, 5, 3]
    got = els.sample(
        "bbels",
        train,
        scales,
        noise,
        dtype=torch.float64,
        mode="fast",
        fast_fraction=0.5,
        fast_seed=3,
        disable=True,
    )
    subset = torch.randperm(6, generator=torch.Generator().manual_seed(3))[:3].sort().values
    assert_close(got, ref_sample("bbels", train[subset], scales, noise))
    # a fraction of 1 is the exact machine
    full = els.sample(
        "bbels",
        train,
        scales,
        noise,
        dtype=torch.float64,
        mode="fast",
        fast_fraction=1.0,
        disable=True,
    )
    assert_close(full, ref_sample("bbels", train, scales, noise))


def test_fast_mode_exact_below_threshold_and_provenance_ids():
    train = random_images(6, 1, 7, 7, seed=11)
    noise = torch.randn(
        1, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(12)
    )
    scales = [3, 3, 5, 3]
    _, traj = els.sample(
        "bbels",
        train,
        scales,
        noise,
        dtype=torch.float64,
        mode="fast",
        fast_fraction=0.5,
        fast_exact_below=0.3,
        return_trajectory=True,
        provenance=True,
        disable=True,
    )
    subset = set(torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3].tolist())
    assert set(traj.provenance[0].image.unique().tolist()) <= subset  # t = 0.75: subset ids
    # the last step (t = 0.25 < 0.3) is exact: its denoised image is the exact machine's
    exact_last = ref_denoise("bbels", traj.x[-2], 0.25, train, 3)
    assert_close(traj.denoised[-1], exact_last)
    assert math.isclose(traj.t[-1], 0.25)


def test_bad_mode_is_named():
    train = random_images(2, 1, 7, 7)
    noise = torch.randn(1, 1, 7, 7)
    with pytest.raises(ValueError, match="mode='slow'"):
        els.sample("bbels", train, [3, 3], noise, mode="slow", disable=True)
    with pytest.raises(ValueError, match="fast_fraction"):
        els.sample("bbels", train, [3, 3], noise, mode="fast", fast_fraction=0.0, disable=True)
