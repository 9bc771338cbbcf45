"""The speed yardstick: the unfused brute force of one interior bbELS evaluation at k=3 plus the same
at k=17 (FashionMNIST, all training images of a class): the candidates unfolded once, then per chunk
of 400,000 candidates one matrix product with the query patches and one exp per pair, folded into a
streaming softmax. A fixed amount of work that any faster sampler is measured against; it follows
ELS_SPEC.md and shares no code with els."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

CHUNK = 400_000


def interior_evaluation(x: torch.Tensor, train: torch.Tensor, k: int, t: float) -> torch.Tensor:
    """Denoised interior pixels [H-k+1, W-k+1] of x [1, 1, H, W] (bbELS interior = ELS interior)."""
    angle = (t / 1.008) * math.pi / 2
    a, b2 = math.cos(angle), math.sin(angle) ** 2
    y = (train.to(torch.int16) * 2 - 255).float() / 255.0 if train.dtype == torch.uint8 else train
    cands = F.unfold(y, k).transpose(1, 2).reshape(-1, k * k)  # every fully-inside patch, once
    centres = cands[:, (k * k) // 2]
    norms = cands.square().sum(1)
    q = F.unfold(x, k)[0].T  # interior queries [P, k*k]
    m = torch.full((q.shape[0],), -math.inf)
    s = torch.zeros(q.shape[0])
    acc = torch.zeros(q.shape[0])
    for i in range(0, cands.shape[0], CHUNK):
        logits = (a / b2) * (q @ cands[i : i + CHUNK].T) - (a * a / (2 * b2)) * norms[i : i + CHUNK]
        new_m = torch.maximum(m, logits.max(1).values)
        f = torch.exp(m - new_m)
        w = torch.exp(logits - new_m[:, None])
        s = s * f + w.sum(1)
        acc = acc * f + w @ centres[i : i + CHUNK]
        m = new_m
    side = x.shape[-1] - k + 1
    return (acc / s).view(-1, side)


def yardstick_seconds(train: torch.Tensor) -> float:
    """Seconds of the k=3 (t=0.05) plus the k=17 (t=0.95) evaluation on a noised training image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, *train.shape[-2:], generator=g)
    start = time.perf_counter()
    with torch.no_grad():
        interior_evaluation(x, train, 3, 0.05)
        interior_evaluation(x, train, 17, 0.95)
    return time.perf_counter() - start
