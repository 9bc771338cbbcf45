"""The training-free denoisers the field compares with ELS (after the Analytic Diffusion Studio):
wiener, pca_locality, optimal, scfdm and nearest_dataset, as machine kinds of `els.score` and
`els.sample`. Definitions: /work/shared/ZOO_SPEC.md; user guide: docs/zoo.md.

Each kind returns the denoised image m(x, t) [B, C, H, W]; its score is s = -(x - a_t m) / b_t^2
(the same reverse process, noise and figures as the patch machines). Per-class statistics
(`ZooStats`: the images, mean and covariance eigenbasis) are built once and can be saved and reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .machines import PARAMETERS, ZOO_KINDS, check_params, denoised, smoothing_noise
from .stats import ZooStats, ZooStatsError

__all__ = [
    "PARAMETERS",
    "ZOO_KINDS",
    "ZooStats",
    "ZooStatsError",
    "check_params",
    "denoise",
    "sample",
    "score",
    "smoothing_noise",
]
DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of chunk temporaries (pca_locality)
PROVENANCE_KINDS = ("pca_locality", "optimal", "scfdm", "nearest_dataset")  # wiener has no softmax


def _stats_for(kind: str, train, stats: ZooStats | None) -> ZooStats:
    if stats is not None:
        if not isinstance(stats, ZooStats):
            raise TypeError(f"stats must be an els.zoo.ZooStats, got {type(stats).__name__}")
        if train is not None:
            stats.check(train)
        return stats
    if train is None:
        raise ValueError("give the training images (train) or prebuilt statistics (stats)")
    # the eigendecomposition only where the kind uses it
    return ZooStats.build(train, gaussian=kind in ("wiener", "pca_locality"))


def _keys(keys, batch: int) -> list:
    if keys is None:
        return list(range(batch))
    keys = list(keys)
    if len(keys) != batch:
        raise ValueError(f"keys: {len(keys)} smoothing keys for a batch of {batch} samples")
    return keys


def _provenance(kind: str, info, shape):
    """Provenance [B, H, W] from the denoiser's (best image, weight, n_eff): per sample for the
    image-level kinds, per entry for pca_locality (per pixel: the channel whose dominant weight is
    largest)."""
    from ..machines import Provenance

    B, C, H, W = shape
    best, weight, n_eff = info
    device = best.device
    if kind == "pca_locality":
        best, weight, n_eff = (v.reshape(B, C, H, W) for v in (best, weight, n_eff))
        channel = weight.argmax(dim=1, keepdim=True)
        best, weight, n_eff = (v.gather(1, channel)[:, 0] for v in (best, weight, n_eff))
    else:
        best, weight, n_eff = (v.reshape(B, 1, 1).expand(B, H, W) for v in (best, weight, n_eff))
    rows = torch.arange(H, device=device).view(1, H, 1).expand(B, H, W)
    cols = torch.arange(W, device=device).view(1, 1, W).expand(B, H, W)
    return Provenance(best.long(), rows, cols, weight, n_eff)


def denoise(
    kind: str,
    stats: ZooStats,
    x: torch.Tensor,
    t: float,
    *,
    keys: Sequence | None = None,
    memory_budget: int | None = None,
    return_provenance: bool = False,
    **params,
):
    """m(x, t) [B, C, H, W] of `kind` (dtype and device of x); with return_provenance also the
    Provenance of the dominant training image (None for wiener, which has no softmax).

    keys (scfdm): one key (int or str) per sample; its smoothing noise at time t comes from a
    generator seeded by (key, t), so a sample's result does not depend on its batch. Default: the
    sample's position in the batch."""
    from ..machines import ieee_float32

    params = check_params(kind, params)
    if not 0.0 < float(t) < 1.0:
        raise ValueError(f"t={t} is outside (0, 1): the denoisers are defined for 0 < t < 1")
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    stats.check(shape=x.shape[1:])
    with_stats = return_provenance and kind in PROVENANCE_KINDS
    with ieee_float32(x.device):
        m, info = denoised(
            kind,
            stats,
            x,
            float(t),
            params,
            keys=_keys(keys, x.shape[0]) if kind == "scfdm" else None,
            budget=memory_budget or DEFAULT_MEMORY_BUDGET,
            with_stats=with_stats,
        )
    m = m.reshape(x.shape)
    if not return_provenance:
        return m
    return m, _provenance(kind, info, x.shape) if with_stats else None


def score(
    kind: str,
    x: torch.Tensor,
    t: float,
    train: torch.Tensor | None = None,
    k: int | None = None,
    *,
    stats: ZooStats | None = None,
    keys: Sequence | None = None,
    memory_budget: int | None = None,
    **params,
) -> torch.Tensor:
    """s(x, t) = -(x - a_t m) / b_t^2 of `kind`, shape of x. k is ignored (no patches); pass
    prebuilt `stats` to reuse the statistics across calls."""
    from ..machines import score_from_denoised

    check_params(kind, params)
    m = denoise(
        kind, _stats_for(kind, train, stats), x, t, keys=keys, memory_budget=memory_budget, **params
    )
    return score_from_denoised(x, m, t)


def sample(
    kind: str,
    train: torch.Tensor | None,
    scales: Sequence[int],
    noise: torch.Tensor,
    *,
    stats: ZooStats | None = None,
    keys: Sequence | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    memory_budget: int | None = None,
    return_trajectory: bool = False,
    provenance: bool = False,
    callback=None,
    disable: bool | None = None,
    **params,
):
    """The reverse process of `kind` from noise [B, C, H, W] (els.sample_reverse): one step per
    schedule entry after the first, k ignored (20 entries = 19 steps). Returns the images, or
    (images, els.Trajectory) with return_trajectory; provenance=True records each step's
    Provenance (the dominant training image) except for wiener, which has none."""
    from ..api import Trajectory
    from ..machines import Provenance
    from ..sampler import sample_reverse
    from ..scales import validate_scales

    params = check_params(kind, params)
    scales = validate_scales(scales, source="scales")
    stats = _stats_for(kind, train, stats)
    device = torch.device(device) if device is not None else noise.device
    x = noise.to(device=device, dtype=dtype)
    stats.check(shape=x.shape[1:])
    keys = _keys(keys, x.shape[0])
    with_prov = provenance and kind in PROVENANCE_KINDS

    def denoiser(x, t, k):
        out = denoise(
            kind,
            stats,
            x,
            t,
            keys=keys,
            memory_budget=memory_budget,
            return_provenance=with_prov,
            **params,
        )
        return (out[0], {"provenance": out[1]}) if with_prov else out

    trajectory = Trajectory() if return_trajectory else None

    def record(step):
        if trajectory is not None:
            trajectory.t.append(step["t"])
            trajectory.k.append(step["k"])
            trajectory.x.append(step["x"].cpu())
            trajectory.denoised.append(step["denoised"].cpu())
            if with_prov:
                p = step["provenance"]
                trajectory.provenance.append(
                    Provenance(*(getattr(p, f).cpu() for f in Provenance.__dataclass_fields__))
                )
        if callback is not None:
            callback(step)

    out = sample_reverse(denoiser, x, scales, callback=record, disable=disable)
    return (out, trajectory) if return_trajectory else out
