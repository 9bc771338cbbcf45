"""The legacy cosine noise schedule and the time grid of the reverse process.

beta(t) = 1 - cos^2((t / 1.008) * pi / 2) (no 0.008 shift: the published scales were calibrated with it),
a_t = sqrt(1 - beta(t)) = cos(...), b_t = sqrt(beta(t)) = sin(...), x_t = a_t x_0 + b_t noise.
"""

from __future__ import annotations

import math


def _angle(t: float) -> float:
    return (t / 1.008) * math.pi / 2


def beta(t: float) -> float:
    """beta(t) = 1 - cos^2((t / 1.008) pi / 2)."""
    return 1.0 - math.cos(_angle(t)) ** 2


def signal_scale(t: float) -> float:
    """a_t = sqrt(1 - beta(t)): how much of the clean image survives at time t."""
    return math.cos(_angle(t))


def noise_scale(t: float) -> float:
    """b_t = sqrt(beta(t)): the standard deviation of the added noise at time t."""
    return math.sin(_angle(t))


def alpha_bar(t: float) -> float:
    """abar_t = 1 - beta(t) = a_t^2."""
    return 1.0 - beta(t)


def reverse_steps(n: int) -> list[tuple[int, float, float]]:
    """The steps (i, t, t_next) of the reverse process with n scales: i = n-1 down to 1, t = i/n.

    scales[0] is never used; the last step lands on t_next = 0, where b = 0.
    """
    if n < 2:
        raise ValueError(f"a schedule needs at least 2 entries (got {n}): scales[0] is never used")
    return [(i, i / n, (i - 1) / n) for i in range(n - 1, 0, -1)]
