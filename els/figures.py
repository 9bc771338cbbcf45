"""Every matplotlib figure of the pipeline (Agg backend, written atomically as PNG).

Images are [C, H, W] tensors: floats in [-1, 1] (samples, predicted clean images, noisy states) or
uint8 (training images). Grayscale shows with a fixed gray map over [-1, 1] so that panels compare.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .io import write_with  # noqa: E402

DPI = 100
MACHINE_LABELS = {
    "ideal": "IS",
    "ls": "LS",
    "els": "ELS",
    "bbels": "bbELS",
    "wiener": "Wiener",
    "pca_locality": "PCA-locality",
    "optimal": "optimal top-k",
    "scfdm": "SCFDM",
    "nearest_dataset": "nearest image",
}
# the comparison figure wraps its machines into bands of at most this many columns
COMPARISON_COLUMNS = 5


def display_array(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] -> values in [0, 1] for imshow: [H, W] for one channel, [H, W, 3] for three."""
    if image.dim() != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(image.shape)}")
    x = image.detach().cpu()
    x = x.double() / 255.0 if x.dtype == torch.uint8 else (x.double() + 1.0) / 2.0
    x = x.clamp(0.0, 1.0).numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def show(ax, image: torch.Tensor | None, title: str | None = None, fontsize: float = 8) -> None:
    """Draw one image without axes (an empty panel when image is None)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if image is not None:
        array = display_array(image)
        ax.imshow(
            array,
            cmap="gray" if array.ndim == 2 else None,
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
    if title:
        ax.set_title(title, fontsize=fontsize)


def save(fig, path: str | os.PathLike) -> Path:
    """Save a figure as PNG atomically and close it."""
    try:
        return write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def machine_label(machine: str) -> str:
    return MACHINE_LABELS.get(machine, machine)


def pair_figure(
    path: str | os.PathLike,
    sample: torch.Tensor,
    neighbour: torch.Tensor,
    *,
    title: str,
    sample_title: str = "sample",
    neighbour_title: str = "nearest training image",
) -> Path:
    """sample | nearest training image, with a title (class, seed, distance)."""
    fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.8))
    show(axes[0], sample, sample_title)
    show(axes[1], neighbour, neighbour_title)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def grid_figure(
    path: str | os.PathLike,
    images: Mapping[tuple[str, str], torch.Tensor],
    rows: Sequence[str],
    columns: Sequence[str],
    *,
    title: str,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Path:
    """A grid of images: images[(row, column)], rows top to bottom, columns left to right."""
    row_labels = list(row_labels or rows)
    column_labels = list(column_labels or columns)
    nr, nc = len(rows), len(columns)
    fig, axes = plt.subplots(nr, nc, figsize=(1.2 * nc + 1.6, 1.2 * nr + 0.8), squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            ax = axes[i][j]
            show(ax, images.get((r, c)), column_labels[j] if i == 0 else None)
            if j == 0:
                ax.set_ylabel(row_labels[i], fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def comparison_figure(
    path: str | os.PathLike,
    columns: Sequence[Mapping],
    *,
    title: str,
) -> Path:
    """One column per machine: the sample on top, its nearest training image below; any number of
    machines, in bands of at most COMPARISON_COLUMNS columns (9 machines: two bands, 5 + 4).

    columns: dicts with 'label', 'sample', 'neighbour' (images) and 'neighbour_title'.
    """
    n = len(columns)
    if n == 0:
        raise ValueError("a comparison figure needs at least one machine")
    per_band = min(n, COMPARISON_COLUMNS)
    bands = -(-n // per_band)
    fig, axes = plt.subplots(
        2 * bands, per_band, figsize=(1.9 * per_band + 0.9, 4.2 * bands + 0.2), squeeze=False
    )
    for j in range(bands * per_band):
        band, c = divmod(j, per_band)
        top, bottom = axes[2 * band][c], axes[2 * band + 1][c]
        if j >= n:  # the last band's unused panels
            top.axis("off")
            bottom.axis("off")
            continue
        col = columns[j]
        show(top, col["sample"], col["label"], fontsize=10)
        show(bottom, col["neighbour"], col.get("neighbour_title"), fontsize=8)
    for band in range(bands):
        axes[2 * band][0].set_ylabel("sample", fontsize=9)
        axes[2 * band + 1][0].set_ylabel("nearest\ntraining image", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def trajectory_figure(
    path: str | os.PathLike,
    t: Sequence[float],
    k: Sequence[int],
    x: torch.Tensor,
    denoised: torch.Tensor,
    *,
    title: str,
    noise: torch.Tensor | None = None,
) -> Path:
    """Per reverse step (columns, t decreasing): x after the step (top) and the predicted clean image
    (bottom), each column annotated with t and the patch size k used at that step."""
    steps = len(t)
    if not (len(k) == steps == x.shape[0] == denoised.shape[0]):
        raise ValueError("t, k, x and denoised must have one entry per step")
    offset = 1 if noise is not None else 0
    n = steps + offset
    fig, axes = plt.subplots(2, n, figsize=(0.85 * n + 0.9, 2.6), squeeze=False)
    if noise is not None:
        show(axes[0][0], noise, "noise", fontsize=7)
        show(axes[1][0], None)
    for j in range(steps):
        show(axes[0][offset + j], x[j], f"t={t[j]:.2f}\nk={k[j]}", fontsize=7)
        show(axes[1][offset + j], denoised[j])
    axes[0][0].set_ylabel("x after step", fontsize=8)
    axes[1][offset].set_ylabel("predicted\nclean", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


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
    from matplotlib.colors import hsv_to_rgb

    from .provenance import displacement, top_sources

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
    ax.imshow(display_array(sample), cmap="gray", vmin=0, vmax=1)
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
        ax.imshow(display_array(train_images[idx]), cmap="gray", vmin=0, vmax=1)
        for spine in ax.spines.values():
            spine.set_edgecolor(palette(rank))
            spine.set_linewidth(4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"train #{idx}: {100 * count / (H * W):.0f}%", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)
