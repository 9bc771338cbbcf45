"""`els.sample`: a machine's reverse process from given noise, with indexes built or reused."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .index import MACHINES, PatchIndex, PatchIndexError, check_patch_size
from .machines import DEFAULT_MEMORY_BUDGET, Provenance, denoise
from .sampler import sample_reverse
from .scales import validate_scales


@dataclass
class Trajectory:
    """Per reverse step (in the order run, t decreasing): t, k, x after the step, the denoised image,
    and the provenance of the denoised image when asked for. Tensors are on the CPU."""

    t: list[float] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    x: list[torch.Tensor] = field(default_factory=list)
    denoised: list[torch.Tensor] = field(default_factory=list)
    provenance: list[Provenance] = field(default_factory=list)


def schedule_patch_sizes(kind: str, scales: Sequence[int]) -> list[int]:
    """The distinct patch sizes a schedule uses (scales[0] never is); [0] for the ideal score."""
    return [0] if kind == "ideal" else sorted(set(scales[1:]))


def build_indexes(kind: str, train: torch.Tensor, scales: Sequence[int], **build_options):
    """One PatchIndex per distinct patch size used by the schedule."""
    return {
        k: PatchIndex.build(train, kind, k, **build_options)
        for k in schedule_patch_sizes(kind, scales)
    }


def sample(
    kind: str,
    train: torch.Tensor | None,
    scales: Sequence[int],
    noise: torch.Tensor,
    *,
    indexes: Mapping[int, PatchIndex] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    memory_budget: int | None = None,
    return_trajectory: bool = False,
    provenance: bool = False,
    callback=None,
    disable: bool | None = None,
    mode: str = "exact",
    fast_fraction: float = 0.25,
    fast_exact_below: float = 0.0,
    fast_seed: int = 0,
    materialize: bool = False,
    **zoo_options,
):
    """Sample with machine `kind` from noise [B, C, H, W], patch size scales[i] at step i.

    train: [N, C, H, W] uint8 or float in [-1, 1] (may be None when `indexes` covers every k).
    indexes: prebuilt PatchIndex per k (from build_indexes or PatchIndex.load) to reuse across calls.
    Returns the final images [B, C, H, W] (dtype, on device), or (images, Trajectory) with
    return_trajectory=True; provenance=True also records each step's Provenance in the trajectory.

    mode: 'exact' (default: the softmax over every candidate) or 'fast' (opt-in, approximate): at
    steps with t >= fast_exact_below the candidates are those of a fixed random subset of
    ceil(fast_fraction * N) training images (chosen by fast_seed; the softmax over a uniform
    subsample is the ratio estimator of the full one), exact below. Provenance image ids always
    refer to the full training set.
    materialize: keep each patch size's candidates as explicit floats while its steps run
    (PatchIndex.materialize; only where they fit in a quarter of memory_budget).
    The training-free denoisers (els.zoo.ZOO_KINDS) take their parameters, `stats` and `keys` as
    zoo_options (see els.zoo.sample); indexes, fast mode and materialize are patch-machine options.
    """
    from . import zoo

    if kind in zoo.ZOO_KINDS:
        if indexes or mode != "exact" or materialize:
            raise ValueError(f"{kind}: indexes, mode='fast' and materialize are for patch machines")
        return zoo.sample(
            kind, train, scales, noise, device=device, dtype=dtype, memory_budget=memory_budget,
            return_trajectory=return_trajectory, provenance=provenance, callback=callback,
            disable=disable, **zoo_options,
        )  # fmt: skip
    if zoo_options:
        raise TypeError(f"machine {kind!r} takes no option {', '.join(sorted(zoo_options))}")
    if kind not in MACHINES:
        raise PatchIndexError(f"unknown machine {kind!r}; expected one of {', '.join(MACHINES)}")
    scales = validate_scales(scales, source="scales")
    device = torch.device(device) if device is not None else noise.device
    x = noise.to(device=device, dtype=dtype)
    H, W = x.shape[-2:]
    needed = schedule_patch_sizes(kind, scales)
    for k in needed:
        if kind != "ideal":
            check_patch_size(kind, k, H, W)
    indexes = dict(indexes or {})
    missing = [k for k in needed if k not in indexes]
    if missing:
        if train is None:
            raise PatchIndexError(f"no index given for k={missing} and no training images")
        # block plans serve the CPU's certified pruning only (see els.machines._prunes)
        plans = "auto" if device.type == "cpu" else False
        indexes.update({k: PatchIndex.build(train, kind, k, blocks=plans) for k in missing})
    on_device = {k: indexes[k].to(device) for k in needed}
    for k in needed:
        on_device[k].check(kind, k)
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode={mode!r}: expected 'exact' or 'fast'")
    subset, fast = None, {}
    if mode == "fast":
        if not 0.0 < fast_fraction <= 1.0:
            raise ValueError(f"fast_fraction={fast_fraction} must be in (0, 1]")
        full = train if train is not None else on_device[needed[0]].images
        N = full.shape[0]
        gen = torch.Generator().manual_seed(fast_seed)
        subset = torch.randperm(N, generator=gen)[: max(1, math.ceil(fast_fraction * N))]
        subset = subset.sort().values
        fast_train = full.cpu()[subset]
        # no block plans: building them costs more than a fast sample's pruning would save
        fast = {k: PatchIndex.build(fast_train, kind, k, blocks=False).to(device) for k in needed}
        subset = subset.to(device)
    budget = memory_budget or DEFAULT_MEMORY_BUDGET
    current = {}

    def denoiser(x, t, k):
        key = 0 if kind == "ideal" else k
        use_fast = mode == "fast" and t >= fast_exact_below
        idx = fast[key] if use_fast else on_device[key]
        if current.get("index") is not idx:
            # one patch size's explicit candidates (materialised, candidate blocks) at a time
            if current.get("index") is not None:
                current["index"].release()
            if materialize and idx.materialized_bytes(dtype) <= budget // 4:
                idx.materialize(dtype, device)
            current["index"] = idx
        out = denoise(idx, x, t, memory_budget=memory_budget, return_provenance=provenance)
        if provenance and use_fast:
            out[1].image = subset[out[1].image]
        return (out[0], {"provenance": out[1]}) if provenance else out

    trajectory = Trajectory() if return_trajectory else None

    def record(step):
        if trajectory is not None:
            trajectory.t.append(step["t"])
            trajectory.k.append(step["k"])
            trajectory.x.append(step["x"].cpu())
            trajectory.denoised.append(step["denoised"].cpu())
            if provenance:
                p = step["provenance"]
                trajectory.provenance.append(
                    Provenance(*(getattr(p, f).cpu() for f in Provenance.__dataclass_fields__))
                )
        if callback is not None:
            callback(step)

    try:
        out = sample_reverse(denoiser, x, scales, callback=record, disable=disable)
    finally:
        if current.get("index") is not None:
            current["index"].release()
    return (out, trajectory) if return_trajectory else out
