"""The five training-free denoisers of /work/shared/ZOO_SPEC.md: m(x, t) [B, C, H, W] of each kind.

Every kind works on flat images (n = C*H*W entries) and, where a softmax is involved, takes it over
all candidates at once (pca_locality: a streaming log-sum-exp over chunks of training images, so
memory stays bounded). Queries are processed one sample at a time: chunking never depends on the
batch, so a seed's result does not depend on which seeds share its batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from ..schedule import noise_scale, signal_scale
from .stats import ZooStats

PARAMETERS = {
    "wiener": {},
    "pca_locality": {"temperature": 1.0, "mask_threshold": 0.005},
    "optimal": {"top_k": 200, "temperature": 1.0},
    "scfdm": {"n_noise": 10, "sigma": 0.1, "top_k": 200, "temperature": 1.0},
    "nearest_dataset": {},
}
ZOO_KINDS = tuple(PARAMETERS)
# exact distances of this many nearest candidates (by the fast expanded form) decide nearest_dataset
NEAREST_RECHECK = 8


def check_params(kind: str, params: dict) -> dict:
    """The kind's parameters with defaults filled in; ValueError naming a bad or unknown one."""
    if kind not in PARAMETERS:
        raise ValueError(f"unknown denoiser {kind!r}; expected one of {', '.join(ZOO_KINDS)}")
    allowed = PARAMETERS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ValueError(f"{kind} has no parameter {', '.join(unknown)} (its parameters: {known})")
    out = {**allowed, **params}
    for name in ("top_k", "n_noise"):
        if name in out:
            value = out[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{kind}: {name}={value!r} must be an integer >= 1")
    for name, value in out.items():
        if name in ("top_k", "n_noise"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"{kind}: {name}={value!r} must be a number")
    if "temperature" in out and not out["temperature"] > 0:
        raise ValueError(f"{kind}: temperature={out['temperature']!r} must be > 0")
    if "mask_threshold" in out and not 0 <= out["mask_threshold"] < 1:
        raise ValueError(f"{kind}: mask_threshold={out['mask_threshold']!r} must be in [0, 1)")
    if "sigma" in out and not out["sigma"] >= 0:
        raise ValueError(f"{kind}: sigma={out['sigma']!r} must be >= 0")
    return out


def smoothing_seed(key, t: float) -> int:
    """Generator seed of scfdm's smoothing noise for one sample at one step: the first 8 bytes of
    sha256(f"{key}/t={t!r}"); a step is identified by its time t = i / n."""
    digest = hashlib.sha256(f"{key}/t={float(t)!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def smoothing_noise(key, t: float, n_noise: int, shape) -> torch.Tensor:
    """[n_noise, *shape] standard normal float32 on the CPU (the same for every dtype/device)."""
    gen = torch.Generator(device="cpu").manual_seed(smoothing_seed(key, t))
    return torch.randn((n_noise, *shape), generator=gen, dtype=torch.float32)


def _softmax_stats(w: torch.Tensor, ids: torch.Tensor):
    """Dominant candidate (ties: first), its weight and 1 / sum w^2 of a weight vector."""
    best = int(torch.argmax(w))
    return ids[best], w[best], 1.0 / (w * w).sum()


# ----------------------------------------------------------------------------- the denoisers


def wiener(stats: ZooStats, x: torch.Tensor, a: float, b2: float) -> torch.Tensor:
    """mu + U diag(a lam / (a^2 lam + b^2)) U^T (x - a mu), in float64, cast to x's dtype."""
    dev = x.device
    g = stats.gain_diagonal(a, b2).to(dev)
    U = stats.derived("eigvecs", torch.float64, dev, lambda: stats.eigvecs)
    mu = stats.derived("mean", torch.float64, dev, lambda: stats.mean)
    centred = x.reshape(x.shape[0], -1).double() - a * mu
    return (mu + ((centred @ U) * g) @ U.T).to(x.dtype)


def _pca_chunk_images(n: int, dtype, budget: int) -> int:
    # residuals, logits, exponentials and their products with the candidates: 4 [chunk, n] buffers
    return max(1, budget // (4 * n * (torch.finfo(dtype).bits // 8)))


def pca_locality_fold(q, images, mask, a: float, scale: float, chunk: int, with_stats: bool):
    """Per output entry j, the softmax over every candidate row of `images` [N, n] of
    -scale * sum_i mask[i, j] (q_i - a phi_i)^2, streamed over chunks of rows (running max,
    rescaled sums). Returns m [n] and, with_stats, (best row, its weight, n_eff) per entry."""
    n = q.shape[0]
    top = torch.full((n,), -math.inf, dtype=q.dtype, device=q.device)
    total = torch.zeros_like(top)
    acc = torch.zeros_like(top)
    if with_stats:
        total2 = torch.zeros_like(top)
        best = torch.zeros(n, dtype=torch.long, device=q.device)
    for start in range(0, images.shape[0], chunk):
        phi = images[start : start + chunk]
        logits = -scale * (((q - a * phi) ** 2) @ mask)  # [c, n]
        chunk_top, chunk_arg = logits.max(dim=0)
        new_top = torch.maximum(top, chunk_top)
        rescale = torch.exp(top - new_top)
        e = torch.exp(logits - new_top)
        total = total * rescale + e.sum(dim=0)
        acc = acc * rescale + (e * phi).sum(dim=0)
        if with_stats:
            total2 = total2 * rescale * rescale + (e * e).sum(dim=0)
            # strictly larger: a tie keeps the earlier (smaller) candidate
            best = torch.where(chunk_top > top, chunk_arg + start, best)
        top = new_top
    m = acc / total
    if not with_stats:
        return m, None
    return m, (best, 1.0 / total, total * total / total2)


def pca_locality(stats, x, a, b2, params, budget, with_stats):
    """Column j of the mask B(t) weighs output entry j's residuals; one global softmax per entry."""
    B, n = x.shape[0], stats.dim
    threshold = params["mask_threshold"]
    mask = stats.derived(
        ("mask", a, b2, threshold), x.dtype, x.device, lambda: stats.mask(a, b2, threshold)
    )
    images = stats.float_images(x.dtype, x.device)
    scale = 1.0 / (2.0 * b2 * params["temperature"])
    chunk = _pca_chunk_images(n, x.dtype, budget)
    flat = x.reshape(B, n)
    parts = [
        pca_locality_fold(flat[i], images, mask, a, scale, chunk, with_stats) for i in range(B)
    ]
    m = torch.stack([p[0] for p in parts])
    if not with_stats:
        return m, None
    return m, tuple(torch.stack([p[1][f] for p in parts]) for f in range(3))


def _optimal_rows(queries, images, sq_norms, a, b2, top_k, temperature, with_stats):
    """optimal's m for each row of queries [r, n]: the softmax of -||q - a phi||^2 / (2 b^2 T)
    over the top_k candidates nearest to q. The candidates are ranked by the expanded form
    a^2 ||phi||^2 - 2a q.phi (one product for all rows; stable sort: ties take the smaller
    index); the softmax uses the distances of the chosen ones computed directly (no cancellation)."""
    K = min(top_k, images.shape[0])
    rank = (a * a) * sq_norms - (2.0 * a) * (queries @ images.T)  # [r, N]
    chosen = torch.sort(rank, dim=1, stable=True).indices[:, :K]
    means, picks = [], []
    for q, ids in zip(queries, chosen, strict=True):
        cand = images[ids]
        logits = -((q - a * cand) ** 2).sum(dim=1) / (2.0 * b2 * temperature)
        w = torch.softmax(logits, dim=0)
        means.append(w @ cand)
        picks.append((ids, w))
    return torch.stack(means), picks


def optimal(stats, x, a, b2, params, with_stats):
    images = stats.float_images(x.dtype, x.device)
    sq = stats.derived("sq_norms", x.dtype, x.device, lambda: stats_sq_norms(stats))
    B = x.shape[0]
    flat = x.reshape(B, -1)
    means, info = [], []
    for i in range(B):
        m, picks = _optimal_rows(
            flat[i : i + 1], images, sq, a, b2, params["top_k"], params["temperature"], with_stats
        )
        means.append(m[0])
        if with_stats:
            info.append(_softmax_stats(picks[0][1], picks[0][0]))
    return torch.stack(means), _stack_stats(info) if with_stats else None


def scfdm(stats, x, a, b2, params, keys: Sequence, t: float, with_stats):
    """The mean of optimal's m over n_noise copies x + sigma z (z keyed by (key, t) per sample)."""
    images = stats.float_images(x.dtype, x.device)
    sq = stats.derived("sq_norms", x.dtype, x.device, lambda: stats_sq_norms(stats))
    B, N = x.shape[0], images.shape[0]
    flat = x.reshape(B, -1)
    means, info = [], []
    for i in range(B):
        z = smoothing_noise(keys[i], t, params["n_noise"], flat.shape[1:])
        rows = flat[i] + params["sigma"] * z.to(device=x.device, dtype=x.dtype)
        m, picks = _optimal_rows(
            rows, images, sq, a, b2, params["top_k"], params["temperature"], with_stats
        )
        means.append(m.mean(dim=0))
        if with_stats:
            # the averaged m is the mixture of the copies' softmaxes, each weighing 1 / n_noise
            w = torch.zeros(N, dtype=x.dtype, device=x.device)
            for ids, weights in picks:
                w.index_add_(0, ids, weights / len(picks))
            info.append(_softmax_stats(w, torch.arange(N, device=x.device)))
    return torch.stack(means), _stack_stats(info) if with_stats else None


def nearest_dataset(stats, x, with_stats):
    """The training image nearest to x unscaled (t ignored; ties: smaller index)."""
    images = stats.float_images(x.dtype, x.device)
    sq = stats.derived("sq_norms", x.dtype, x.device, lambda: stats_sq_norms(stats))
    B = x.shape[0]
    flat = x.reshape(B, -1)
    out, info = [], []
    for i in range(B):
        rank = sq - 2.0 * (images @ flat[i])
        few = min(NEAREST_RECHECK, images.shape[0])
        ids = torch.sort(torch.sort(rank, stable=True).indices[:few]).values
        exact = ((images[ids] - flat[i]) ** 2).sum(dim=1)
        best = ids[int(torch.argmin(exact))]  # first minimum: the smaller index
        out.append(images[best])
        one = torch.ones((), dtype=x.dtype, device=x.device)
        info.append((best, one, one))
    return torch.stack(out), _stack_stats(info) if with_stats else None


def stats_sq_norms(stats: ZooStats) -> torch.Tensor:
    return (stats.float_images(torch.float64, "cpu") ** 2).sum(dim=1)


def _stack_stats(info):
    return tuple(torch.stack([torch.as_tensor(v[f]) for v in info]) for f in range(3))


def denoised(kind, stats, x, t, params, *, keys, budget, with_stats):
    """m [B, n] of `kind` at time t and (with_stats) per-sample or per-entry (best training image,
    its weight, n_eff); wiener has no softmax and gives None."""
    a, b = signal_scale(t), noise_scale(t)
    b2 = b * b
    if kind == "wiener":
        return wiener(stats, x, a, b2), None
    if kind == "pca_locality":
        return pca_locality(stats, x, a, b2, params, budget, with_stats)
    if kind == "optimal":
        return optimal(stats, x, a, b2, params, with_stats)
    if kind == "scfdm":
        return scfdm(stats, x, a, b2, params, keys, t, with_stats)
    return nearest_dataset(stats, x, with_stats)
