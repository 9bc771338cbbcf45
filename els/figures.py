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
    neighbours: Sequence[tuple[torch.Tensor, str]],
    *,
    title: str,
    sample_title: str = "sample",
) -> Path:
    """sample | each (training image, its panel title), e.g. the nearest training image in the
    sample's class and the nearest in the whole training set, with a title (class, seed)."""
    if not neighbours:
        raise ValueError("pair_figure needs at least one (image, title) neighbour panel")
    n = 1 + len(neighbours)
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n + 0.2, 3.0))
    show(axes[0], sample, sample_title, fontsize=8)
    for ax, (image, panel_title) in zip(axes[1:], neighbours, strict=True):
        show(ax, image, panel_title, fontsize=8)
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


# Distinct colours for the top sources of a mosaic (tab10 without its grey, which means "other").
SOURCE_COLOURS = tuple(matplotlib.colormaps["tab10"](i)[:3] for i in (0, 1, 2, 3, 4, 5, 6, 8, 9))
OTHER_GREY = 0.55  # pixels from any source outside the top ones
SAMPLE_FAINTNESS = 0.35  # weight of the sample under the region colours


def plural(n: int, noun: str) -> str:
    """'1 source', '872 sources'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def percent(fraction: float) -> str:
    """A share as text a reader can tell from zero: '0.4%', '3.2%', '45%'."""
    return f"{100 * fraction:.1f}%" if fraction < 0.1 else f"{100 * fraction:.0f}%"


def faint_gray(sample: torch.Tensor) -> np.ndarray:
    """The sample as a light gray [H, W] in [0, 1] (colour images: their mean over channels)."""
    array = display_array(sample)
    gray = array if array.ndim == 2 else array.mean(axis=-1)
    return 1.0 - SAMPLE_FAINTNESS * (1.0 - gray)


def mosaic_regions(
    sample: torch.Tensor, source_image: torch.Tensor, n_top: int
) -> tuple[np.ndarray, list[tuple[int, int, tuple[float, float, float]]]]:
    """RGB [H, W, 3] of the mosaic as regions, and the legend.

    Every pixel whose source (the training image its dominant patch came from) is one of the n_top
    most used gets that source's colour, the rest OTHER_GREY; both are multiplied by a faint copy of
    the sample, so the garment's shape stays visible through the regions. The legend lists
    (training image index, pixel count, colour), most used first."""
    if n_top > len(SOURCE_COLOURS):
        raise ValueError(f"n_top = {n_top}: at most {len(SOURCE_COLOURS)} distinct colours")
    from .provenance import top_sources

    src = source_image.cpu().numpy()
    rgb = np.full((*src.shape, 3), OTHER_GREY)
    legend = []
    for (index, count), colour in zip(
        top_sources(source_image, n_top), SOURCE_COLOURS, strict=False
    ):
        rgb[src == index] = colour
        legend.append((index, count, colour))
    return rgb * faint_gray(sample)[..., None], legend


def displacement_rgb(dr, dc, max_distance: float) -> np.ndarray:
    """Colour wheel: hue = direction of (dr, dc) (the angle of the arrow from the pixel to its
    source, counter-clockwise from 'right' on screen, where rows grow downwards), saturation =
    distance / max_distance (white = copied in place); full brightness everywhere."""
    from matplotlib.colors import hsv_to_rgb

    dr, dc = np.asarray(dr, dtype=np.float64), np.asarray(dc, dtype=np.float64)
    hue = (np.arctan2(-dr, dc) / (2 * np.pi)) % 1.0
    saturation = np.clip(np.hypot(dr, dc) / max(max_distance, 1e-12), 0.0, 1.0)
    return hsv_to_rgb(np.stack([hue, saturation, np.ones_like(hue)], axis=-1))


def _wheel_legend(ax, max_distance: float, size: int = 65) -> None:
    """The key of displacement_rgb: a disc of radius max_distance, direction labels round it."""
    r = np.linspace(-max_distance, max_distance, size)
    dr, dc = np.meshgrid(r, r, indexing="ij")
    wheel = displacement_rgb(dr, dc, max_distance)
    outside = np.hypot(dr, dc) > max_distance
    wheel = np.concatenate([wheel, np.where(outside, 0.0, 1.0)[..., None]], axis=-1)
    extent = (-max_distance, max_distance, max_distance, -max_distance)
    ax.imshow(wheel, extent=extent, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    pad = 1.3 * max_distance
    for text, (x, y) in {
        "up": (0, -pad),
        "down": (0, pad),
        "left": (-pad, 0),
        "right": (pad, 0),
    }.items():
        ax.text(x, y, text, ha="center", va="center", fontsize=7)
    ax.set_xlim(-1.6 * max_distance, 1.6 * max_distance)
    ax.set_ylim(1.6 * max_distance, -1.6 * max_distance)
    ax.set_title(
        f"key: where the source lies\n(white: in place; rim: {max_distance:.0f} px)", fontsize=8
    )


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


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
    n_top: int = 8,
) -> Path:
    """One sample's provenance figure.

    sample [C, H, W]; source_* [H, W] of the last step; n_eff [steps, H, W]; train_images [N, C, H, W]
    (indexed by source_image). Top row: the sample; the mosaic as regions (mosaic_regions: the n_top
    most used training images each in its colour over a faint copy of the sample, the rest grey, a
    legend naming them); the displacement of each pixel's patch (source position minus pixel
    position) on a colour wheel (displacement_rgb) with its key; the effective number of candidates
    per pixel over the reverse steps (median and 10-90% band). Bottom row: the top sources'
    thumbnails, framed in their colours.
    """
    from matplotlib.patches import Patch

    from .provenance import displacement

    H, W = source_image.shape
    regions, legend = mosaic_regions(sample, source_image, n_top)
    dr, dc = displacement(source_row, source_col)
    distance = torch.sqrt(dr.double() ** 2 + dc.double() ** 2)
    max_distance = max(float(distance.max()), 1.0)
    n_sources = int(torch.unique(source_image).numel())
    covered = sum(count for _, count, _ in legend) / (H * W)

    fig = plt.figure(figsize=(15, 6.2))
    # top: sample | mosaic | its legend | displacement | its colour wheel | (gap) | n_eff
    top = fig.add_gridspec(
        1, 7, left=0.02, right=0.985, top=0.84, bottom=0.36,
        width_ratios=[1, 1.5, 0.7, 1.5, 0.8, 0.3, 2.2], wspace=0.08,
    )  # fmt: skip
    show(fig.add_subplot(top[0, 0]), sample, "sample", fontsize=9)
    ax = fig.add_subplot(top[0, 1])
    ax.imshow(regions, interpolation="nearest")
    _bare(ax)
    ax.set_title(
        f"mosaic: source training image per pixel\n{plural(n_sources, 'source')}; "
        + (f"the top {len(legend)} supply" if len(legend) > 1 else "the top one supplies")
        + f" {percent(covered)} of the pixels",
        fontsize=9,
    )
    handles = [
        Patch(color=colour, label=f"#{index}: {100 * count / (H * W):.1f}%")
        for index, count, colour in legend
    ]
    if n_sources > len(legend):
        handles.append(Patch(color=(OTHER_GREY,) * 3, label=f"{n_sources - len(legend)} others"))
    ax = fig.add_subplot(top[0, 2])
    ax.axis("off")
    ax.legend(
        handles=handles,
        loc="center left",
        fontsize=8,
        title="training image:\nshare of pixels",
        title_fontsize=8,
        frameon=False,
    )
    ax = fig.add_subplot(top[0, 3])
    ax.imshow(displacement_rgb(dr.numpy(), dc.numpy(), max_distance), interpolation="nearest")
    _bare(ax)
    ax.set_title("patch displacement\n(source position - pixel position)", fontsize=9)
    _wheel_legend(fig.add_subplot(top[0, 4]), max_distance)

    ax = fig.add_subplot(top[0, 6])
    per_step = n_eff.reshape(n_eff.shape[0], -1).double()
    steps = np.arange(len(t_steps))
    q10, q50, q90 = (torch.quantile(per_step, q, dim=1).numpy() for q in (0.1, 0.5, 0.9))
    ax.fill_between(steps, q10, q90, alpha=0.3, label="10-90% of pixels")
    ax.plot(steps, q50, marker="o", markersize=3, label="median pixel")
    ax.set_yscale("log")
    every = max(1, len(steps) // 7)
    ax.set_xticks(
        steps[::every],
        [f"{t:.2f}\nk={k}" for t, k in list(zip(t_steps, k_steps, strict=True))[::every]],
        fontsize=7,
    )
    ax.set_xlabel("reverse step (t, patch size k)", fontsize=8)
    ax.set_title("effective candidates per pixel, 1/Σw²", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)

    # bottom: the top sources, framed in their colours
    columns = max(len(legend), 8)
    bottom = fig.add_gridspec(1, columns, left=0.1, right=0.9, top=0.25, bottom=0.03, wspace=0.3)
    for column, (index, count, colour) in enumerate(legend):
        ax = fig.add_subplot(bottom[0, column])
        show(ax, train_images[index], f"#{index}: {100 * count / (H * W):.1f}%", fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
    fig.text(0.1, 0.275, "the top sources (training images of this class's set)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)
