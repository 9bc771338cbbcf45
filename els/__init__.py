"""Equivariant Local Score machines (Kamb & Ganguli, arXiv 2412.20292): analytic diffusion samplers
that denoise each pixel with a softmax over training-set patches.

Public API: `score`, `sample`, `PatchIndex` (+ `denoise`, `sample_reverse`); the training-free
denoisers of els.zoo (`ZOO_KINDS`, `ZooStats`) through the same `score` and `sample`.
"""

from .api import Trajectory, sample, schedule_patch_sizes
from .index import MACHINES, PatchIndex, PatchIndexError
from .machines import (
    Provenance,
    bbels_score,
    denoise,
    els_score,
    ideal_score,
    ls_score,
    score,
)
from .sampler import sample_reverse
from .zoo import ZOO_KINDS, ZooStats, ZooStatsError

__all__ = [
    "MACHINES",
    "PatchIndex",
    "PatchIndexError",
    "Provenance",
    "Trajectory",
    "ZOO_KINDS",
    "ZooStats",
    "ZooStatsError",
    "bbels_score",
    "denoise",
    "els_score",
    "ideal_score",
    "ls_score",
    "sample",
    "sample_reverse",
    "schedule_patch_sizes",
    "score",
]
__version__ = "0.1.0"
