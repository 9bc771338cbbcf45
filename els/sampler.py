"""The deterministic (DDIM-style) reverse process, in the manner of k-diffusion's samplers: a small
function of (denoiser, x, schedule) that knows nothing about machines, indexes or files."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .schedule import noise_scale, reverse_steps, signal_scale

# denoiser(x, t, k) -> denoised image m(x, t) [B, C, H, W], or (m, extras dict for the callback)
Denoiser = Callable[[torch.Tensor, float, int], "torch.Tensor | tuple[torch.Tensor, dict]"]


@torch.no_grad()
def sample_reverse(
    denoiser: Denoiser,
    x: torch.Tensor,
    scales: Sequence[int],
    *,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Run the reverse process from noise x (treated as x at t = (n-1)/n) with patch size scales[i] at
    step i, i = n-1 .. 1, t = i / n. Each step:

        eps = (x - a_t m) / b_t                     (= -b_t s(x, t))
        x   = sqrt(abar_t' / abar_t) x + (b_t' - sqrt(abar_t' / abar_t) b_t) eps

    callback receives {'i', 't', 'k', 'x' (after the step), 'denoised'} and any extras of the denoiser.
    """
    for i, t, t_next in tqdm(reverse_steps(len(scales)), desc="reverse steps", disable=disable):
        k = scales[i]
        out = denoiser(x, t, k)
        denoised, extras = out if isinstance(out, tuple) else (out, {})
        a, b = signal_scale(t), noise_scale(t)
        ratio = signal_scale(t_next) / a  # sqrt(abar_t' / abar_t)
        eps = (x - a * denoised) / b
        x = ratio * x + (noise_scale(t_next) - ratio * b) * eps
        if callback is not None:
            callback({"i": i, "t": t, "k": k, "x": x, "denoised": denoised, **extras})
    return x
