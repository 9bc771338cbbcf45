"""The yardstick: a straightforward exact bbELS, as the benchmark issue describes it.

No index, no precomputation, no deduplication, no pruning. For every score evaluation and every query
family (interior pixels, each edge row, each edge column, each corner pixel), loop over batches of 64
training images, compute the dot products of the query patches with every candidate patch of the batch
by conv2d (the query patches are the filters), the candidates' squared norms by conv2d of the squared
images with a ones kernel, and fold the weights into a streaming softmax (running max, running
normaliser, running weighted sum of centres). Seeds of a batch are stacked as extra filters.

It is kept deliberately independent of els' PatchIndex and softmax code; it only follows ELS_SPEC.md.
tests/test_baseline.py checks it against the loop implementation in tests/reference.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BATCH_IMAGES = 64


def _ab(t: float) -> tuple[float, float]:
    angle = (t / 1.008) * math.pi / 2
    return math.cos(angle), math.sin(angle)


def _to_float(images: torch.Tensor, dtype) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return (images.to(torch.int16) * 2 - 255).to(dtype) / 255.0
    return images.to(dtype)


def _softmax_over_batches(train, dtype, filters, q_sq, a, b2, slab_of, centres_of, select=None):
    """Weighted mean of candidate centres for the queries `filters` [Q, C, k, k].

    slab_of(imgs, padded) -> the image region whose conv2d outputs are the candidates;
    select(conv output) -> the outputs that are candidates (all if None);
    centres_of(imgs) -> centre values [n, C, h, w] of those candidates.
    """
    C, k = filters.shape[1], filters.shape[-1]
    dev = filters.device  # the training images are moved there batch by batch
    ones = torch.ones(1, C, k, k, dtype=dtype, device=dev)
    Q = filters.shape[0]
    run_max = torch.full((Q,), float("-inf"), dtype=dtype, device=dev)
    run_sum = torch.zeros(Q, dtype=dtype, device=dev)
    run_acc = torch.zeros(Q, C, dtype=dtype, device=dev)
    d = k // 2
    for i in range(0, train.shape[0], BATCH_IMAGES):
        imgs = _to_float(train[i : i + BATCH_IMAGES].to(dev), dtype)
        padded = F.pad(imgs, (d, d, d, d))
        slab = slab_of(imgs, padded)
        dots = F.conv2d(slab, filters)  # [n, Q, h, w]
        c_sq = F.conv2d(slab * slab, ones)  # [n, 1, h, w]
        centres = centres_of(imgs)  # [n, C, h, w]
        if select is not None:
            dots, c_sq = select(dots), select(c_sq)
        dist = q_sq.view(1, Q, 1, 1) - 2 * a * dots + a * a * c_sq
        logits = (-dist / (2 * b2)).permute(1, 0, 2, 3).reshape(Q, -1)  # [Q, n*h*w]
        cent = centres.permute(0, 2, 3, 1).reshape(-1, C)  # [n*h*w, C]
        new_max = torch.maximum(run_max, logits.amax(dim=1))
        w = torch.exp(logits - new_max[:, None])
        scale = torch.exp(run_max - new_max)
        run_sum = run_sum * scale + w.sum(dim=1)
        run_acc = run_acc * scale[:, None] + w @ cent
        run_max = new_max
    return run_acc / run_sum[:, None]


def baseline_denoise(x: torch.Tensor, t: float, train: torch.Tensor, k: int) -> torch.Tensor:
    """bbELS denoised image m(x, t) [B, C, H, W]; train uint8 or float [N, C, H, W]."""
    a, b = _ab(t)
    b2 = b * b
    B, C, H, W = x.shape
    dtype = x.dtype
    d = k // 2
    queries = F.unfold(F.pad(x, (d, d, d, d)), k)  # [B, C*k*k, H*W], zero padding
    queries = queries.permute(0, 2, 1).reshape(B, H, W, C, k, k)
    m = torch.empty_like(x)
    near_row = [r < d or r >= H - d for r in range(H)]
    near_col = [c < d or c >= W - d for c in range(W)]
    in_rows = [r for r in range(H) if not near_row[r]]
    in_cols = [c for c in range(W) if not near_col[c]]

    def run(rows, cols, slab_of, centres_of, select=None):
        # queries at the pixels rows x cols (lists) of every seed, seeds stacked as filters
        f = queries[:, rows][:, :, cols].reshape(-1, C, k, k)
        mean = _softmax_over_batches(
            train, dtype, f, f.square().sum(dim=(1, 2, 3)), a, b2, slab_of, centres_of, select
        )
        m[:, :, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = mean.view(
            B, len(rows), len(cols), C
        ).permute(0, 3, 1, 2)

    if in_rows and in_cols:  # interior: every fully-inside patch
        run(
            in_rows,
            in_cols,
            lambda imgs, padded: imgs,
            lambda imgs: imgs[:, :, d : H - d, d : W - d],
        )
    for r in range(H):
        if near_row[r] and in_cols:  # edge row: zero-padded patches on row r, interior columns
            run(
                [r],
                in_cols,
                lambda imgs, padded, r=r: padded[:, :, r : r + k, :],
                lambda imgs, r=r: imgs[:, :, r : r + 1, d : W - d],
                select=lambda out: out[..., d : W - d],
            )
    for c in range(W):
        if near_col[c] and in_rows:  # edge column: zero-padded patches on column c, interior rows
            run(
                in_rows,
                [c],
                lambda imgs, padded, c=c: padded[:, :, :, c : c + k],
                lambda imgs, c=c: imgs[:, :, d : H - d, c : c + 1],
                select=lambda out: out[:, :, d : H - d, :],
            )
    for r in range(H):
        for c in range(W):
            if near_row[r] and near_col[c]:  # corner: the patch at the same position
                run(
                    [r],
                    [c],
                    lambda imgs, padded, r=r, c=c: padded[:, :, r : r + k, c : c + k],
                    lambda imgs, r=r, c=c: imgs[:, :, r : r + 1, c : c + 1],
                )
    return m


def baseline_sample(train, scales, noise, *, dtype=torch.float32, callback=None):
    """The spec's reverse process with the baseline bbELS; noise [B, C, H, W]."""
    n = len(scales)
    x = noise.to(dtype)
    for i in range(n - 1, 0, -1):
        t, t_next = i / n, (i - 1) / n
        a, b = _ab(t)
        a_next, b_next = _ab(t_next)
        m = baseline_denoise(x, t, train, scales[i])
        eps = (x - a * m) / b
        ratio = a_next / a
        x = ratio * x + (b_next - ratio * b) * eps
        if callback is not None:
            callback(i, x)
    return x
