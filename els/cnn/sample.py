"""Sampling a noise predictor with the machines' deterministic reverse process (els.sample_reverse),
and recording its own trajectory and score for calibration.

The reverse process takes a denoiser m(x, t) = E[x_0 | x_t]; for a noise predictor
m = (x - b_t eps_theta) / a_t, and its score is s = -eps_theta / b_t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..sampler import sample_reverse
from ..schedule import noise_scale, signal_scale
from .models import NoisePredictor

# the reverse process needs a patch size per step; a CNN ignores it, so the schedule is all ones
CNN_SCALE = 1


def predict_noise(
    model: NoisePredictor, x: torch.Tensor, t: float, labels: torch.Tensor | None
) -> torch.Tensor:
    """eps_theta(x, t, labels) in the model's dtype and device, returned in x's."""
    p = next(model.parameters())
    eps = model(x.to(p.device, p.dtype), float(t), None if labels is None else labels.to(p.device))
    return eps.to(x.device, x.dtype)


def cnn_score(
    model: NoisePredictor, x: torch.Tensor, t: float, labels: torch.Tensor | None
) -> torch.Tensor:
    """s = -eps_theta(x, t, labels) / b_t."""
    return -predict_noise(model, x, t, labels) / noise_scale(t)


def denoised_from_noise(x: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
    """m = (x - b_t eps) / a_t."""
    return (x - noise_scale(t) * eps) / signal_scale(t)


@dataclass
class CnnTrajectory:
    """Per reverse step, in the order run (t decreasing): t, the state x_t the model was evaluated at,
    and the model's score there. Tensors are on the CPU."""

    t: list[float] = field(default_factory=list)
    x: list[torch.Tensor] = field(default_factory=list)
    score: list[torch.Tensor] = field(default_factory=list)


def sample_cnn(
    model: NoisePredictor,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    n_steps: int = 20,
    *,
    return_trajectory: bool = False,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
):
    """Sample from noise [B, C, H, W] (treated as x at t = (n_steps - 1) / n_steps, as the machines
    do) with class labels [B] (None: unconditional token). The computation runs in noise's dtype and
    device (move or cast the model to match). Returns the images, or (images, CnnTrajectory)."""
    if labels is not None and labels.shape != noise.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != batch {noise.shape[0]}")
    trajectory = CnnTrajectory() if return_trajectory else None

    def denoiser(x: torch.Tensor, t: float, k: int) -> torch.Tensor:
        eps = predict_noise(model, x, t, labels)
        if trajectory is not None:
            trajectory.t.append(t)
            trajectory.x.append(x.detach().cpu().clone())
            trajectory.score.append((-eps / noise_scale(t)).detach().cpu())
        return denoised_from_noise(x, eps, t)

    was_training = model.training
    model.eval()
    try:
        out = sample_reverse(
            denoiser, noise, [CNN_SCALE] * n_steps, callback=callback, disable=disable
        )
    finally:
        model.train(was_training)
    return (out, trajectory) if return_trajectory else out
