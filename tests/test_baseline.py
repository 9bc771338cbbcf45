"""The benchmark's yardstick (benchmarks/baseline.py) against the loop implementation of the spec."""

import sys
from pathlib import Path

import pytest
import torch
from reference import random_8bit_images, random_images, ref_denoise, ref_sample

from els.index import to_float

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.baseline import baseline_denoise, baseline_sample  # noqa: E402


def assert_close(actual, expected, rtol=1e-9):
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("H,W,C,N", [(7, 7, 1, 4), (8, 10, 3, 3), (6, 6, 2, 3)])
@pytest.mark.parametrize("k", [1, 3, 5, 9, 13])
@pytest.mark.parametrize("t", [0.05, 0.95])
def test_baseline_matches_loop(H, W, C, N, k, t):
    train = random_images(N, C, H, W, seed=1)
    x = random_images(2, C, H, W, seed=2)
    assert_close(baseline_denoise(x, t, train, k), ref_denoise("bbels", x, t, train, k))


def test_baseline_uint8_and_more_than_one_image_batch():
    train8 = random_8bit_images(
        70, 1, 6, 6, seed=3
    )  # 70 > 64: two batches of the streaming softmax
    x = random_images(1, 1, 6, 6, seed=4)
    got = baseline_denoise(x, 0.2, train8, 3)
    assert_close(got, ref_denoise("bbels", x, 0.2, to_float(train8, torch.float64), 3))


def test_baseline_sample_matches_loop():
    train = random_images(3, 1, 7, 7, seed=5)
    noise = torch.randn(2, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    scales = [3, 3, 5, 3]
    got = baseline_sample(train, scales, noise, dtype=torch.float64)
    assert_close(got, ref_sample("bbels", train, scales, noise))
