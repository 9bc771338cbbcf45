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


def _to_display(img: torch.Tensor):
    """[C, H, W] in [-1, 1] (or uint8) -> array for imshow."""
    img = img.detach().cpu()
    if img.dtype == torch.uint8:
        img = img.float() / 127.5 - 1
    img = ((img.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def plot_provenance(
    path,
    sample: torch.Tensor,
    source_image: torch.Tensor,
    source_row: torch.Tensor,
    source_col: torch.Tensor,
    source_weight: torch.Tensor,
    n_eff: torch.Tensor,
    t_steps: Sequence[float],
    k_steps: Sequence[int],
    train_images: torch.Tensor,
    *,
    title: str = "",
    n_top: int = 6,
) -> None:
    """One sample's provenance figure.

    sample [C, H, W]; source_* [H, W] of the last step; n_eff [steps, H, W]; train_images [N, C, H, W]
    (indexed by source_image). Panels: the sample; each pixel coloured by the training image its
    dominant patch came from (top n_top images in colour, the rest grey) with their thumbnails below;
    the displacement of the copied patch (hue = direction, brightness = distance); the effective number
    of candidates per pixel over the reverse steps (median and 10-90% band). Both maps fade a pixel
    towards white by 1 - its dominant weight: where many patches are equally good (flat background)
    the "source" is a tie, not a finding.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import hsv_to_rgb

    top = top_sources(source_image, n_top)
    palette = plt.get_cmap("tab10")
    H, W = source_image.shape
    colour_map = np.full((H, W, 3), 0.85)
    for rank, (idx, _) in enumerate(top):
        colour_map[(source_image == idx).numpy()] = palette(rank)[:3]

    confidence = source_weight.double().clamp(0, 1).numpy()[..., None]
    colour_map = colour_map * confidence + (1 - confidence)
    dr, dc = displacement(source_row, source_col)
    dist = torch.sqrt(dr.double() ** 2 + dc.double() ** 2)
    hue = ((torch.atan2(dr.double(), dc.double()) / (2 * np.pi)) % 1.0).numpy()
    value = (dist / max(float(dist.max()), 1.0)).numpy()
    disp_rgb = hsv_to_rgb(np.stack([hue, np.where(value > 0, 0.9, 0.0), value], axis=-1))
    disp_rgb = disp_rgb * confidence + (1 - confidence)

    fig = plt.figure(figsize=(13, 5.2))
    grid = fig.add_gridspec(2, max(4, n_top), height_ratios=[3, 1.2])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(_to_display(sample), cmap="gray", vmin=0, vmax=1)
    ax.set_title("sample", fontsize=9)
    ax = fig.add_subplot(grid[0, 1])
    ax.imshow(colour_map)
    n_src = int(torch.unique(source_image).numel())
    ax.set_title(f"source image per pixel\n{n_src} distinct, top {len(top)} coloured", fontsize=9)
    ax = fig.add_subplot(grid[0, 2])
    ax.imshow(disp_rgb)
    ax.set_title(
        f"patch displacement (max {float(dist.max()):.0f} px)\nblack = copied in place", fontsize=9
    )
    for a in fig.axes:
        a.set_xticks([])
        a.set_yticks([])
    ax = fig.add_subplot(grid[0, 3:])
    per_step = n_eff.reshape(n_eff.shape[0], -1).double()
    steps = np.arange(len(t_steps))
    q10, q50, q90 = (torch.quantile(per_step, q, dim=1).numpy() for q in (0.1, 0.5, 0.9))
    ax.fill_between(steps, q10, q90, alpha=0.3, label="10-90% of pixels")
    ax.plot(steps, q50, marker="o", label="median pixel")
    ax.set_yscale("log")
    ax.set_xticks(
        steps, [f"{t:.2f}\nk={k}" for t, k in zip(t_steps, k_steps, strict=True)], fontsize=6
    )
    ax.set_xlabel("reverse step (t, patch size)")
    ax.set_ylabel("effective candidates 1/Σw²")
    ax.legend(fontsize=7)
    for rank, (idx, count) in enumerate(top):
        ax = fig.add_subplot(grid[1, rank])
        ax.imshow(_to_display(train_images[idx]), cmap="gray", vmin=0, vmax=1)
        for spine in ax.spines.values():
            spine.set_edgecolor(palette(rank))
            spine.set_linewidth(4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"train #{idx}: {100 * count / (H * W):.0f}%", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
