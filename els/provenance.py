"""Patch-mosaic provenance: where every pixel of a sample came from.

At the last reverse step the sample IS the denoised image, each pixel the softmax-weighted centre of
training patches. The dominant candidate of that softmax names a training image and the position of the
patch centre in it; `Provenance` (els.machines) holds these per pixel. This module turns them into the
numbers of summary.csv and the provenance figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .machines import Provenance


def stack_provenance(steps: Sequence[Provenance]) -> dict[str, torch.Tensor]:
    """Per-step provenance of one batch -> tensors for a sample file.

    Returns final_image/final_row/final_col (long) and final_weight [B, H, W] of the last step, and
    n_eff [steps, B, H, W] for every step (in the order run).
    """
    if not steps:
        raise ValueError("no provenance recorded: sample with provenance=True")
    last = steps[-1]
    return {
        "source_image": last.image,
        "source_row": last.row,
        "source_col": last.col,
        "source_weight": last.weight,
        "n_eff": torch.stack([p.n_eff for p in steps]),
    }


def mosaic_summary(source_image: torch.Tensor, source_weight: torch.Tensor) -> dict[str, float]:
    """Numbers of one sample's mosaic ([H, W] maps of its last step).

    n_sources: distinct training images its pixels come from; top_source_share: share of pixels taken
    from the single most used image (1.0 = a copy of one training image, memorisation);
    mean_dominant_weight: mean softmax weight of the dominant patch (1.0 = every pixel from one patch).
    """
    ids, counts = torch.unique(source_image.reshape(-1), return_counts=True)
    return {
        "n_sources": int(ids.numel()),
        "top_source_share": float(counts.max()) / source_image.numel(),
        "mean_dominant_weight": float(source_weight.double().mean()),
    }


def displacement(
    source_row: torch.Tensor, source_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source row - row, source col - col) per pixel: 0 where a patch is copied in place (LS, IS);
    equivariant machines move patches around."""
    H, W = source_row.shape[-2:]
    rows = torch.arange(H).view(H, 1)
    cols = torch.arange(W).view(1, W)
    return source_row - rows, source_col - cols


def top_sources(source_image: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """The n most used training images as (index, pixel count), most used first."""
    ids, counts = torch.unique(source_image.reshape(-1), return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)[:n]
    return [(int(ids[i]), int(counts[i])) for i in order]
