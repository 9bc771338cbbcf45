"""Comparing CNN samples with machine samples from the same noise, seed for seed.

The authors' evaluation correlates the centred, flattened images: r = <a - mean a, b - mean b> /
(||a - mean a|| ||b - mean b||), the Pearson correlation over pixels; the paper's "r^2" is its square
(columns r_<machine>, r2_<machine>). The Analytic Diffusion Studio reports instead the coefficient of
determination of the machine's image as a prediction of the CNN's, R^2 = 1 - SS_res / SS_tot
(columns R2_<machine>): it also counts differences of brightness and contrast, can be negative, and
is never above r^2. Every figure and table says which one it shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from ..io import write_with


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson r between a[i] and b[i] flattened and centred, [B] float64. An image with no variance
    has no defined correlation: NaN, so it cannot pass for a match."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(dim=1) / denom
    # rounding can push |r| a hair above 1 for identical images
    return torch.where(denom > 0, r.clamp(-1.0, 1.0), torch.nan)


def coefficient_of_determination(reference: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """R^2 = 1 - sum (ref - pred)^2 / sum (ref - mean ref)^2 per image, [B] float64 (NaN where the
    reference has no variance)."""
    if reference.shape != prediction.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(prediction.shape)}")
    ref = reference.reshape(reference.shape[0], -1).double()
    pred = prediction.reshape(prediction.shape[0], -1).double()
    ss_res = ((ref - pred) ** 2).sum(dim=1)
    ss_tot = ((ref - ref.mean(dim=1, keepdim=True)) ** 2).sum(dim=1)
    return torch.where(ss_tot > 0, 1.0 - ss_res / ss_tot, torch.nan)


def r2_table(
    cnn: torch.Tensor,
    machines: dict[str, torch.Tensor],
    *,
    seeds: Sequence[int],
    classes: Sequence[int | str] | None = None,
) -> pd.DataFrame:
    """One row per sample: seed, class, and for each machine name m: r_m, r2_m (squared Pearson r)
    and R2_m (coefficient of determination) against the CNN.

    cnn, machines[m]: [B, C, H, W] samples from the same noise, in the same order as seeds.
    """
    B = cnn.shape[0]
    if len(seeds) != B or (classes is not None and len(classes) != B):
        raise ValueError(f"{B} samples but {len(seeds)} seeds / classes")
    df = pd.DataFrame({"seed": list(seeds)})
    if classes is not None:
        df.insert(0, "class", list(classes))
    for name, images in machines.items():
        r = pearson_r(cnn, images).numpy()
        df[f"r_{name}"] = r
        df[f"r2_{name}"] = r**2
        df[f"R2_{name}"] = coefficient_of_determination(cnn, images).numpy()
    return df


METRIC_PREFIXES = ("r_", "r2_", "R2_")
# Kamb & Ganguli (arXiv 2412.20292), FashionMNIST, median r^2 (squared Pearson r of centred, flattened
# images) of the ELS machine's samples (bbELS for zero padding) against the CNN's from the same noise.
# Table 1: the CNN sampled with 150 steps, the machine with 20; Table 2: both with 20 steps.
PAPER_MEDIAN_R2 = {
    "ResNet, Table 1 (CNN 150 steps)": 0.94,
    "UNet, Table 1 (CNN 150 steps)": 0.93,
    "ResNet, Table 2 (20 steps)": 0.90,
    "UNet, Table 2 (20 steps)": 0.91,
}


def paper_table(df: pd.DataFrame, machines: Sequence[str], model: str) -> pd.DataFrame:
    """Medians of this run beside the paper's: one row per compared machine (r^2 and R^2 of this
    model, n), then one row per published median (the paper reports its ELS machine only)."""
    rows = [
        {
            "source": f"this run: {model}",
            "machine": display_name(m),
            "n": int(df[f"r2_{m}"].notna().sum()),
            "median_r2": float(df[f"r2_{m}"].median()),
            "median_R2": float(df[f"R2_{m}"].median()),
        }
        for m in machines
    ]
    rows += [
        {
            "source": f"Kamb & Ganguli: {name}",
            "machine": "ELS (bbELS)",
            "n": None,
            "median_r2": value,
            "median_R2": None,
        }
        for name, value in PAPER_MEDIAN_R2.items()
    ]
    return pd.DataFrame(rows)


def plot_schedules(
    schedules: dict[str, Sequence[int]], path: str | Path, *, title: str = ""
) -> None:
    """Patch size k against reverse step i (t = i / n) for each schedule, one curve each; entry 0
    (never used by the reverse process) is left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    markers = "os^v"
    for j, (label, scales) in enumerate(schedules.items()):
        steps = list(range(1, len(scales)))
        ax.plot(steps, list(scales[1:]), marker=markers[j % 4], ms=4, lw=1.4, label=label)
    ax.set_xlabel("reverse step i (t = i / n; sampling runs from the right)")
    ax.set_ylabel("patch size k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "patch-size schedules", fontsize=9)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    finally:
        plt.close(fig)


def summarize(df: pd.DataFrame, by: str | None = "class") -> pd.DataFrame:
    """Medians (and counts) of every r / r2 / R2 column, overall and per `by` group if present."""
    cols = [c for c in df.columns if c.startswith(METRIC_PREFIXES)]
    overall = df[cols].median().to_frame().T
    overall.insert(0, "n", len(df))
    overall.insert(0, "group", "all")
    if by is None or by not in df.columns:
        return overall
    per = df.groupby(by)[cols].median()
    per.insert(0, "n", df.groupby(by).size())
    per = per.reset_index().rename(columns={by: "group"})
    per["group"] = per["group"].map(lambda g: f"{by}={g}")
    return pd.concat([overall, per], ignore_index=True)


DISPLAY_NAMES = {
    "ideal": "IS",
    "bbels": "bbELS",
    "els": "ELS",
    "ls": "LS",
    "wiener": "Wiener",
    "pca_locality": "PCA-locality",
    "optimal": "optimal top-k",
    "scfdm": "SCFDM",
    "nearest_dataset": "nearest image",
}


def display_name(machine: str) -> str:
    return DISPLAY_NAMES.get(machine, machine)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_r2_scatter(
    df: pd.DataFrame, path: str | Path, *, x: str = "ideal", y: str = "els", title: str = ""
) -> None:
    """Per seed: x = r^2(CNN, IS sample), y = r^2(CNN, ELS sample), the diagonal drawn. Shows r^2
    (the squared Pearson r of the centred, flattened images), as the paper's figure does."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--", label="y = x")
    ax.scatter(df[f"r2_{x}"], df[f"r2_{y}"], s=14, alpha=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    nx, ny = display_name(x), display_name(y)
    ax.set_xlabel(f"r² (CNN vs {nx} sample)")
    ax.set_ylabel(f"r² (CNN vs {ny} sample)")
    med_x, med_y = df[f"r2_{x}"].median(), df[f"r2_{y}"].median()
    ax.set_title(title or f"median r²: {ny} {med_y:.3f}, {nx} {med_x:.3f}", fontsize=9)
    ax.text(
        0.02,
        0.98,
        "r² = squared Pearson r of the\ncentred, flattened images",
        fontsize=6.5,
        va="top",
        transform=ax.transAxes,
        color="0.3",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    finally:
        plt.close(fig)


def plot_sample_grid(
    columns: dict[str, torch.Tensor],
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
    column_notes: dict[str, Sequence[str]] | None = None,
) -> None:
    """Side-by-side grid: one row per sample, one column per source (e.g. CNN | ELS | IS), images in
    [-1, 1] shown on a fixed grey scale (no per-image contrast stretch, so differences are real).
    column_notes[name][row]: text under that image (e.g. its r^2 against the CNN)."""
    plt = _pyplot()
    names = list(columns)
    rows = columns[names[0]].shape[0]
    fig, axes = plt.subplots(
        rows, len(names), figsize=(1.3 * len(names), 1.3 * rows + 0.3), squeeze=False
    )
    for j, name in enumerate(names):
        images = columns[name].detach().cpu().float().clamp(-1, 1)
        for i in range(rows):
            ax = axes[i, j]
            img = images[i]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            else:
                ax.imshow(((img.permute(1, 2, 0) + 1) / 2).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=7)
            if column_notes and name in column_notes:
                ax.set_xlabel(column_notes[name][i], fontsize=7)
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    finally:
        plt.close(fig)
