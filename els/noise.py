"""The starting noise of a sample, a pure function of (dataset, class, seed).

The generator seed is the first 8 bytes of sha256(f"{dataset}/{class}/{seed}"), so the noise does not
depend on job order, on which seeds share a batch, on the executor or on the machine: the IS, LS, ELS
and bbELS samples of one (dataset, class, seed) start from the same noise, which is what the machine
comparison needs. `class_label` is the class id, or "all" for unconditional runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def noise_key(dataset: str, class_label: int | str, seed: int) -> str:
    """The string the noise is derived from, e.g. 'FashionMNIST/3/0' or 'CelebA/all/7'."""
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(class_label, bool):
        raise ValueError(f"class label must be an int or 'all', got {class_label!r}")
    label = str(class_label)
    if not (label == "all" or label.isdigit()):
        raise ValueError(f"class label must be a non-negative int or 'all', got {class_label!r}")
    return f"{dataset}/{int(label) if label.isdigit() else label}/{int(seed)}"


def noise_seed(dataset: str, class_label: int | str, seed: int) -> int:
    """The torch.Generator seed: the first 8 bytes (big-endian) of sha256 of noise_key(...)."""
    digest = hashlib.sha256(noise_key(dataset, class_label, seed).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def noise_for(
    dataset: str, class_label: int | str, seed: int, shape: Sequence[int]
) -> torch.Tensor:
    """Standard normal noise of `shape` (e.g. [C, H, W]), float32 on the CPU, for this sample."""
    generator = torch.Generator(device="cpu").manual_seed(noise_seed(dataset, class_label, seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
