"""Calibrating the machine's patch-size schedule against a trained CNN (the paper's procedure).

Along the CNN's own reverse trajectory, at every step and for every candidate patch size k, compare the
machine's score s_k(x_t) with the CNN's score by cosine similarity over the flattened image (per
sample), take the median over samples, and pick the k with the largest median. scales[0] is never used
by the reverse process (there is no state at t = 0); it is set to scales[1] so the file stays valid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..index import PatchIndex, check_patch_size
from ..io import write_with
from ..machines import score as machine_score
from ..scales import validate_scales, write_scales
from .sample import CnnTrajectory

DEFAULT_PATCH_SIZES = tuple(range(3, 27, 2))  # 3, 5, ..., 25


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a[i] and b[i] flattened, [B] float64 (0 where either is all zeros)."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    denom = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denom > 0, (a * b).sum(dim=1) / denom.clamp_min(1e-300), 0.0)


def machine_cosines(
    trajectory: CnnTrajectory,
    train_images: torch.Tensor,
    machine: str,
    patch_sizes: Sequence[int],
    *,
    build_index: Callable[[torch.Tensor, str, int], PatchIndex] = PatchIndex.build,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool | None = None,
) -> torch.Tensor:
    """cos(s_machine,k(x_t), s_cnn(x_t)) for every step, k and sample: [steps, len(patch_sizes), B].

    One index per k is built and dropped in turn (the outer loop), so memory holds one at a time.
    train_images: the images the CNN learned (for a conditional CNN: those of the sampled class).
    Indexes are built on the CPU and moved to `device`, where the machine's scores are computed.
    """
    H, W = train_images.shape[-2:]
    for k in patch_sizes:
        check_patch_size(machine, k, H, W)
    steps, B = len(trajectory.t), trajectory.x[0].shape[0]
    out = torch.empty(steps, len(patch_sizes), B, dtype=torch.float64)
    bar = tqdm(
        total=steps * len(patch_sizes), desc=f"calibrate {machine}", disable=progress is False
    )
    for j, k in enumerate(patch_sizes):
        index = build_index(train_images.cpu(), machine, k).to(device)
        for i, (t, x, s_cnn) in enumerate(
            zip(trajectory.t, trajectory.x, trajectory.score, strict=True)
        ):
            x = x.to(device=device, dtype=dtype)
            s_k = machine_score(machine, x, t, index=index)
            out[i, j] = cosine_per_sample(s_k.cpu(), s_cnn)
            bar.update(1)
        del index
    bar.close()
    return out


@dataclass
class Calibration:
    """The calibration's result: patch_sizes [K], t per step (reverse order, as run), cosines
    [steps, K, B], their median over samples [steps, K], and the chosen schedule scales[0..n-1]."""

    patch_sizes: list[int]
    t: list[float]
    cosines: torch.Tensor
    median: torch.Tensor
    scales: list[int]

    @classmethod
    def from_cosines(
        cls, patch_sizes: Sequence[int], t: Sequence[float], cosines: torch.Tensor
    ) -> Calibration:
        """Median over samples, argmax over k per step (ties: the smallest k)."""
        patch_sizes = [int(k) for k in patch_sizes]
        n = len(t) + 1  # the reverse process runs steps i = n-1 .. 1
        median = cosines.median(dim=2).values
        best = median.argmax(dim=1)
        scales = [0] * n
        for step, t_step in enumerate(t):
            i = round(t_step * n)
            scales[i] = patch_sizes[int(best[step])]
        scales[0] = scales[1]
        validate_scales(scales, source="calibrated schedule")
        return cls(patch_sizes, list(t), cosines, median, scales)

    def table(self) -> pd.DataFrame:
        """Long table: step index i, t, k, median cosine, chosen (bool)."""
        n = len(self.t) + 1
        rows = []
        for step, t in enumerate(self.t):
            i = round(t * n)
            for j, k in enumerate(self.patch_sizes):
                rows.append(
                    {
                        "i": i,
                        "t": t,
                        "k": k,
                        "median_cosine": float(self.median[step, j]),
                        "chosen": self.scales[i] == k,
                    }
                )
        return pd.DataFrame(rows)

    def write(
        self, schedule_path: str | Path, table_path: str | Path | None = None, comment: str = ""
    ) -> None:
        """The schedule in scales/'s text format, and optionally the cosine table as CSV."""
        lines = [
            "patch sizes calibrated against a CNN: per step, the k whose machine score is closest in "
            "cosine similarity to the CNN's score along the CNN's trajectory (median over "
            f"{self.cosines.shape[2]} samples); candidates {self.patch_sizes}; scales[0] = scales[1] "
            "(never used)",
        ]
        if comment:
            lines.append(comment)
        write_scales(schedule_path, self.scales, comment="\n".join(lines))
        if table_path is not None:
            table = self.table()
            write_with(table_path, lambda tmp: table.to_csv(tmp, index=False))


def calibrate(
    trajectories: Sequence[tuple[CnnTrajectory, torch.Tensor]],
    machine: str,
    patch_sizes: Sequence[int] = DEFAULT_PATCH_SIZES,
    **options,
) -> Calibration:
    """Calibrate from one or more (CnnTrajectory, training images) pairs (e.g. one per class of a
    conditional CNN: each trajectory's samples are compared with the machine on its own class's
    images); the medians are over all samples together. options: see machine_cosines."""
    if not trajectories:
        raise ValueError("calibration needs at least one trajectory")
    t = trajectories[0][0].t
    if any(traj.t != t for traj, _ in trajectories):
        raise ValueError("all trajectories must share the same time grid")
    cosines = torch.cat(
        [
            machine_cosines(traj, images, machine, patch_sizes, **options)
            for traj, images in trajectories
        ],
        dim=2,
    )
    return Calibration.from_cosines(patch_sizes, t, cosines)


def plot_calibration(result: Calibration, path: str | Path, *, title: str = "") -> None:
    """Heatmap of the median cosine (step x k) with the chosen k per step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    median = result.median.numpy()  # [steps, K], rows in the order run (t decreasing)
    fig, ax = plt.subplots(
        figsize=(0.45 * len(result.patch_sizes) + 2.2, 0.28 * len(result.t) + 1.4)
    )
    im = ax.imshow(
        median, aspect="auto", cmap="viridis", vmin=max(0.0, float(median.min())), vmax=1
    )
    best = median.argmax(axis=1)
    ax.scatter(
        best,
        range(len(result.t)),
        marker="o",
        facecolors="none",
        edgecolors="red",
        s=40,
        label="chosen k",
    )
    ax.set_xticks(range(len(result.patch_sizes)), [str(k) for k in result.patch_sizes])
    ax.set_yticks(range(len(result.t)), [f"{t:.2f}" for t in result.t])
    ax.set_xlabel("patch size k")
    ax.set_ylabel("t (reverse step)")
    ax.set_title(title or "median cosine(machine score, CNN score)", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.colorbar(im, ax=ax, label="median cosine over samples")
    fig.tight_layout()
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    finally:
        plt.close(fig)
