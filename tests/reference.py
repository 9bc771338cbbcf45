"""A slow, obviously-correct loop implementation of ELS_SPEC.md, for tests only (float64).

Every patch is cut out pixel by pixel; every candidate set is listed by explicit loops that follow the
spec's wording; the softmax is a plain logsumexp over the full list of distances.
"""

from __future__ import annotations

import math

import torch


def ref_schedule(t):
    angle = (t / 1.008) * math.pi / 2
    beta = 1 - math.cos(angle) ** 2
    return math.sqrt(1 - beta), math.sqrt(beta)


def patch(img, r, c, k, padding):
    """The k x k patch of img [C, H, W] centred on (r, c): zeros or wrap-around outside the image."""
    C, H, W = img.shape
    d = k // 2
    rows = [r - d + i for i in range(k)]
    cols = [c - d + j for j in range(k)]
    if padding == "circular":
        return img[:, [rr % H for rr in rows]][:, :, [cc % W for cc in cols]]
    out = torch.zeros(C, k, k, dtype=img.dtype)
    for i, rr in enumerate(rows):
        for j, cc in enumerate(cols):
            if 0 <= rr < H and 0 <= cc < W:
                out[:, i, j] = img[:, rr, cc]
    return out


def train_patch(train, n, r, c, k, cache):
    """Zero-padded patch of training image n, cached per call: the loops ask for each one many times."""
    key = (n, r, c, k)
    if key not in cache:
        cache[key] = patch(train[n], r, c, k, "zeros")
    return cache[key]


def weighted_centre(query, candidates, centres, a, b):
    """sum_c w(c) centre(c), w ∝ exp(-||q - a c||^2 / (2 b^2)) normalised over all candidates."""
    logits = torch.stack([-((query - a * c) ** 2).sum() / (2 * b * b) for c in candidates])
    w = torch.exp(logits - torch.logsumexp(logits, 0))
    return sum(wi * ce for wi, ce in zip(w, centres, strict=True)), w


def candidates_at(kind, train, r, c, k, cache):
    """The (patch, centre, (image, row, col)) candidates of pixel (r, c), following the spec."""
    N, C, H, W = train.shape
    d = k // 2
    inside = [(rr, cc) for rr in range(d, H - d) for cc in range(d, W - d)]
    # candidate patches are zero-padded (ELS's are fully inside the image, so padding never shows)
    if kind == "ls":
        positions = [(r, c)]
    elif kind == "els":
        positions = inside
    elif kind == "bbels":
        near_row = r < d or r >= H - d
        near_col = c < d or c >= W - d
        if near_row and near_col:
            positions = [(r, c)]
        elif near_row:
            positions = [(r, cc) for cc in range(d, W - d)]
        elif near_col:
            positions = [(rr, c) for rr in range(d, H - d)]
        else:
            positions = inside
    else:
        raise ValueError(kind)
    out = []
    for n in range(N):
        for rr, cc in positions:
            p = train_patch(train, n, rr, cc, k, cache)
            out.append((p, train[n, :, rr, cc], (n, rr, cc)))
    return out


def ref_denoise(kind, x, t, train, k=None, with_weights=False):
    """Denoised image m [B, C, H, W] of the spec's machines by loops; optionally the weights per pixel."""
    a, b = ref_schedule(t)
    B, C, H, W = x.shape
    m = torch.zeros_like(x)
    weights = {}
    cache = {}
    for bi in range(B):
        if kind == "ideal":
            mean, w = weighted_centre(x[bi], list(train), list(train), a, b)
            m[bi] = mean
            weights[bi] = [(w, [(n, None, None) for n in range(train.shape[0])])]
            continue
        for r in range(H):
            for c in range(W):
                query = patch(x[bi], r, c, k, "circular" if kind == "els" else "zeros")
                cands = candidates_at(kind, train, r, c, k, cache)
                mean, w = weighted_centre(
                    query, [p for p, _, _ in cands], [ce for _, ce, _ in cands], a, b
                )
                m[bi, :, r, c] = mean
                weights[(bi, r, c)] = (w, [src for _, _, src in cands])
    return (m, weights) if with_weights else m


def ref_score(kind, x, t, train, k=None):
    a, b = ref_schedule(t)
    return -(x - a * ref_denoise(kind, x, t, train, k)) / (b * b)


def ref_sample(kind, train, scales, noise):
    """The spec's reverse process, step by step."""
    n = len(scales)
    x = noise.clone()
    for i in range(n - 1, 0, -1):
        t, t_next = i / n, (i - 1) / n
        a, b = ref_schedule(t)
        a_next, b_next = ref_schedule(t_next)
        abar, abar_next = a * a, a_next * a_next
        eps = -b * ref_score(kind, x, t, train, scales[i])
        ratio = math.sqrt(abar_next / abar)
        x = ratio * x + (b_next - ratio * b) * eps
    return x


def random_images(n, c, h, w, *, seed=0, dtype=torch.float64):
    """Uniform random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=dtype) * 2 - 1


def random_8bit_images(n, c, h, w, *, seed=0, levels=4, background=0.75):
    """uint8 images: mostly black background with a few grey levels, like FashionMNIST's edges, so that
    identical patches are common."""
    g = torch.Generator().manual_seed(seed)
    grey = torch.randint(1, levels, (n, c, h, w), generator=g) * (255 // (levels - 1))
    ink = torch.rand(n, c, h, w, generator=g) > background
    return (grey * ink).to(torch.uint8)


def softmax_chunk(
    G, rows, M, E, *, generator, padding, dtype=torch.float32, scale=1.0, bias_scale=1.0
):
    """Random tensors of one candidate chunk, for the softmax-fold tests: values [G, rows, M] (query-
    candidate products or candidate patches, candidates last) times `scale`, bias [G, M] times
    `bias_scale` (log multiplicities included), centres with their row of ones [G, E + 1, M], and log
    multiplicities [G, M] (group 1's last 3 candidates are padding, -inf) or None. Candidate 5 is an
    exact tie of candidate 2: the first (smallest id) must win."""
    g = generator
    values = torch.randn(G, rows, M, generator=g, dtype=dtype) * scale
    bias = torch.randn(G, M, generator=g, dtype=dtype) * bias_scale
    centres = torch.cat([torch.randn(G, E, M, generator=g, dtype=dtype), torch.ones(G, 1, M)], 1)
    log_mult = None
    if padding:
        log_mult = torch.log(torch.randint(1, 4, (G, M), generator=g).to(dtype))
        log_mult[1:, -3:] = float("-inf")  # group 1 has 3 fewer candidates: padding
        bias = bias + log_mult
    values[:, :, 5] = values[:, :, 2]
    bias[:, 5] = bias[:, 2]
    if log_mult is not None:
        log_mult[:, 5] = log_mult[:, 2]
    return values, bias, centres.to(dtype), log_mult
