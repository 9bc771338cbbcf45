"""`els.sample`: a machine's reverse process from given noise, with indexes built or reused."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .index import MACHINES, PatchIndex, PatchIndexError, check_patch_size
from .machines import Provenance, denoise
from .sampler import sample_reverse
from .scales import validate_scales
from .schedule import reverse_steps


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


def sample(
    kind: str,
    train: torch.Tensor | None,
    scales: Sequence[int],
    noise: torch.Tensor,
    *,
    index: PatchIndex | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    return_trajectory: bool = False,
    provenance: bool = False,
    callback=None,
    disable: bool | None = None,
    **zoo_options,
):
    """Sample with machine `kind` from noise [B, C, H, W], patch size scales[i] at step i.

    train: [N, C, H, W] uint8 or float in [-1, 1] (may be None when `index` is given).
    index: a PatchIndex serving every k of the schedule (PatchIndex.build or .load), to reuse.
    noise: finite float [B, C, H, W] (N(0, I)); dtype: float32 (default) or float64.
    Returns the final images [B, C, H, W] (dtype, on device), or (images, Trajectory) with
    return_trajectory=True; provenance=True also records each step's Provenance in the trajectory
    (a patch machine's holds n_eff only before the last step, whose dominant candidates are the
    sources of the final image).
    The training-free denoisers (els.zoo.ZOO_KINDS) take their parameters, `stats`, `keys` and
    `memory_budget` as zoo_options (see els.zoo.sample); `index` is a patch-machine option.
    """
    from . import zoo

    if kind in zoo.ZOO_KINDS:
        if index is not None:
            raise ValueError(
                f"{kind}: a PatchIndex is for the patch machines (zoo kinds use stats)"
            )
        return zoo.sample(
            kind, train, scales, noise, device=device, dtype=dtype,
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
    if kind != "ideal":
        for k in needed:
            check_patch_size(kind, k, H, W)
    if index is None:
        if train is None:
            raise PatchIndexError("give the training images (train) or a PatchIndex (index)")
        index = PatchIndex.build(train, kind, needed)
    missing = [k for k in needed if k not in index.ks]
    if index.machine != kind or missing:
        raise PatchIndexError(
            f"the index is for machine {index.machine!r} at k={list(index.ks)}; the schedule "
            f"needs {kind!r} at k={needed}" + (f" (missing {missing})" if missing else "")
        )
    index = index.to(device)

    last_t = reverse_steps(len(scales))[-1][1]

    def denoiser(x, t, k):
        out = denoise(
            index,
            x,
            t,
            None if kind == "ideal" else k,
            return_provenance=provenance,
            provenance_sources=t == last_t,  # the sources of the final image only
        )
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
                fields = (getattr(p, f) for f in Provenance.__dataclass_fields__)
                trajectory.provenance.append(
                    Provenance(*(None if v is None else v.cpu() for v in fields))
                )
        if callback is not None:
            callback(step)

    try:
        out = sample_reverse(denoiser, x, scales, callback=record, disable=disable)
    finally:
        index.release()
    return (out, trajectory) if return_trajectory else out
