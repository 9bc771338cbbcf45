"""The four score machines as data: ideal (IS), local (LS), equivariant local (ELS), boundary-broken
ELS (bbELS).

Each machine computes, per pixel, the softmax-weighted mean m of candidate centres (its estimate of
E[x_0 | x_t]); the score is s = -(x - a_t m) / b_t^2. A patch machine is its query padding and a
list of blocks (Q, R, D): the query pixels p in rectangle Q take as candidates the k x k patches of
every training image centred at c = p + d, d in rectangle D, c in rectangle R (h = k // 2, the
"inner" range [h, size - 1 - h], the "edge" ranges the rest):

| machine | padding  | Q                     | R            | D                                   |
|---------|----------|-----------------------|--------------|-------------------------------------|
| ls      | zeros    | every pixel           | every pixel  | {0}                                 |
| els     | circular | every pixel           | inner x inner| R - Q (every fully-inside patch)    |
| bbels   | zeros    | inner x inner         | inner x inner| R - Q                               |
|         |          | edge rows x inner cols| same as Q    | {0} x (inner - inner): same row     |
|         |          | inner rows x edge cols| same as Q    | (inner - inner) x {0}: same column  |
|         |          | edge rows x edge cols | same as Q    | {0}: the same position              |

(bbELS with k >= H and k >= W keeps only the last kind of block: it is LS, as the spec says.) The
kernel (els.kernel) runs every block; the ideal score is one matrix product with whole images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .index import (
    MACHINES,
    PatchIndex,
    PatchIndexError,
    check_patch_size,
    check_train_images,
    to_float,
)
from .kernel import N_EFF, NO_STATS, SOURCES, patch_softmax
from .schedule import noise_scale, signal_scale


@dataclass
class Provenance:
    """Per pixel [B, H, W]: the dominant candidate's training image, the row and column of its patch
    centre in that image, its softmax weight (None where only n_eff was asked for), and the
    effective number of candidates 1 / sum w^2."""

    image: torch.Tensor | None
    row: torch.Tensor | None
    col: torch.Tensor | None
    weight: torch.Tensor | None
    n_eff: torch.Tensor


def query_padding(machine: str) -> str:
    """ELS pads circularly (it models circular-padded CNNs); the others pad with zeros."""
    return "circular" if machine == "els" else "constant"


def machine_blocks(machine: str, k: int, height: int, width: int) -> torch.Tensor:
    """The machine's (Q, R, D) blocks at patch size k, [nb, 12] int64 (see the module docstring):
    each row holds Q, R, D as (r0, r1, c0, c1), inclusive."""
    check_patch_size(machine, k, height, width)
    H, W, h = height, width, k // 2
    every = ((0, H - 1), (0, W - 1))
    if machine == "ls":
        return torch.tensor([[0, H - 1, 0, W - 1] * 2 + [0, 0, 0, 0]], dtype=torch.long)
    inner_r, inner_c = (h, H - 1 - h), (h, W - 1 - h)
    has_r, has_c = inner_r[0] <= inner_r[1], inner_c[0] <= inner_c[1]

    def diff(cands, queries):
        return (cands[0] - queries[1], cands[1] - queries[0])

    blocks = []

    def add(q, r, d):
        blocks.append([*q[0], *q[1], *r[0], *r[1], *d[0], *d[1]])

    if machine == "els":
        add(every, (inner_r, inner_c), (diff(inner_r, every[0]), diff(inner_c, every[1])))
        return torch.tensor(blocks, dtype=torch.long)
    if machine != "bbels":
        raise PatchIndexError(f"machine {machine!r} has no patch blocks")
    # edge ranges, each row (column) in exactly one: [0, h) and [max(h, H - h), H)
    edge_r = [e for e in ((0, min(h, H) - 1), (max(h, H - h), H - 1)) if e[0] <= e[1]]
    edge_c = [e for e in ((0, min(h, W) - 1), (max(h, W - h), W - 1)) if e[0] <= e[1]]
    zero = (0, 0)
    if has_r and has_c:
        inner = (inner_r, inner_c)
        add(inner, inner, (diff(inner_r, inner_r), diff(inner_c, inner_c)))
    if has_c:
        for er in edge_r:
            q = (er, inner_c)
            add(q, q, (zero, diff(inner_c, inner_c)))
    if has_r:
        for ec in edge_c:
            q = (inner_r, ec)
            add(q, q, (diff(inner_r, inner_r), zero))
    for er in edge_r:
        for ec in edge_c:
            q = (er, ec)
            add(q, q, (zero, zero))
    return torch.tensor(blocks, dtype=torch.long)


def _check_query(x: torch.Tensor, t: float, index: PatchIndex) -> None:
    if not 0.0 < float(t) < 1.0:
        raise ValueError(f"t={t} is outside (0, 1): the score is defined for 0 < t < 1")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
    if tuple(x.shape[1:]) != tuple(index.images.shape[1:]):
        raise ValueError(
            f"x has image shape {tuple(x.shape[1:])}, the training set "
            f"{tuple(index.images.shape[1:])}"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values: a score needs a finite x")


def denoise(
    index: PatchIndex,
    x: torch.Tensor,
    t: float,
    k: int | None = None,
    *,
    return_provenance: bool = False,
    provenance_sources: bool = True,
):
    """The machine's denoised image m(x, t) [B, C, H, W] (and Provenance if asked).

    x: float32 or float64 [B, C, H, W], finite (x_t; noise is N(0, I)); 0 < t < 1; k: the patch
    size, one of index.ks (may be left out when the index serves one). The arithmetic is IEEE
    float32 or float64 everywhere (never TF32 on a GPU). With provenance_sources=False a patch
    machine's Provenance holds n_eff only (image, row, col and weight None): tracking each pixel's
    dominant candidate is a sizeable part of the kernel's time, and a sample's provenance needs it
    at its last step only."""
    _check_query(x, t, index)
    a, b = signal_scale(t), noise_scale(t)
    b2 = b * b
    if index.machine == "ideal":
        return _ideal_denoise(index, x, a, b2, return_provenance)
    k = index.k if k is None else k
    index.check(index.machine, k)
    B, C, H, W = x.shape
    h = k // 2
    queries = F.pad(x, (h, h, h, h), mode=query_padding(index.machine)) if h else x
    train, pad = index.padded_images(x.dtype, x.device)
    norms = index.candidate_norms(k, x.dtype, x.device)
    blocks = machine_blocks(index.machine, k, H, W)
    stats = (SOURCES if provenance_sources else N_EFF) if return_provenance else NO_STATS
    out = patch_softmax(queries, train, pad, norms, blocks, k, a / b2, a * a / (2 * b2), stats)
    if not return_provenance:
        return out.mean
    return out.mean, Provenance(
        out.best_image, out.best_row, out.best_col, out.best_weight, out.n_eff
    )


def _ideal_denoise(index: PatchIndex, x: torch.Tensor, a: float, b2: float, provenance: bool):
    """IS: one softmax over whole training images, logits (2a <x, phi> - a^2 |phi|^2) / (2 b^2);
    each query image alone, so a batch equals its images alone bit for bit."""
    B, C, H, W = x.shape
    if B > 1:
        parts = [_ideal_denoise(index, x[i : i + 1], a, b2, provenance) for i in range(B)]
        if not provenance:
            return torch.cat(parts)
        fields = Provenance.__dataclass_fields__
        return torch.cat([p[0] for p in parts]), Provenance(
            *(torch.cat([getattr(p[1], f) for p in parts]) for f in fields)
        )
    phi = to_float(index.images.to(x.device), x.dtype).reshape(-1, C * H * W)
    with ieee_float32(x.device):
        dots = x.reshape(1, -1) @ phi.T
    logits = (a / b2) * dots - (a * a / (2 * b2)) * phi.square().sum(1)
    w = torch.softmax(logits, dim=1)
    m = (w @ phi).reshape(B, C, H, W)
    if not provenance:
        return m
    best = logits.argmax(1)  # the first of equal maxima: the smallest image id
    n_eff = 1.0 / w.square().sum(1)
    per_pixel = lambda v: v.reshape(B, 1, 1).expand(B, H, W)  # noqa: E731
    rows = torch.arange(H, device=x.device).view(1, H, 1).expand(B, H, W)
    cols = torch.arange(W, device=x.device).view(1, 1, W).expand(B, H, W)
    weight = w.gather(1, best[:, None])[:, 0]
    return m, Provenance(per_pixel(best), rows, cols, per_pixel(weight), per_pixel(n_eff))


class ieee_float32:
    """IEEE float32 in a GPU's matrix products while the block runs (TF32 has 10 mantissa bits:
    7e-4 relative error in a sample, where the CPU's float32 gives 1e-6). No change on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


def score_from_denoised(x: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
    """s = -(x - a m) / b^2."""
    a, b = signal_scale(t), noise_scale(t)
    return -(x - a * denoised) / (b * b)


def score(
    kind: str,
    x: torch.Tensor,
    t: float,
    train: torch.Tensor | None = None,
    k: int | None = None,
    *,
    index: PatchIndex | None = None,
    **zoo_options,
) -> torch.Tensor:
    """s(x, t) of machine `kind` ('ideal', 'ls', 'els', 'bbels'), shape of x.

    x: float32/float64 [B, C, H, W], finite; 0 < t < 1. train: [N, C, H, W] uint8 (8-bit images)
    or float in [-1, 1]; k: odd patch size (ignored by 'ideal'). Pass a prebuilt `index` instead
    of train to reuse it across calls. The training-free denoisers (els.zoo.ZOO_KINDS) take their
    parameters (and memory_budget) as zoo_options.
    """
    from . import zoo

    if kind in zoo.ZOO_KINDS:
        return zoo.score(kind, x, t, train, k, **zoo_options)
    if zoo_options:
        raise TypeError(f"machine {kind!r} takes no option {', '.join(sorted(zoo_options))}")
    if kind not in MACHINES:
        raise PatchIndexError(f"unknown machine {kind!r}; expected one of {', '.join(MACHINES)}")
    if index is None:
        if train is None:
            raise ValueError("give the training images (train) or a prebuilt PatchIndex (index)")
        check_train_images(train)
        index = PatchIndex.build(train, kind, k)
    else:
        index.check(kind, None if kind == "ideal" else k)
    m = denoise(index.to(x.device), x, t, k)
    return score_from_denoised(x, m, t)


def ideal_score(x, t, train, **kw):
    """IS: whole images against whole training images."""
    return score("ideal", x, t, train, **kw)


def ls_score(x, t, train, k, **kw):
    """LS: each pixel's zero-padded patch against the same-position patch of every training image."""
    return score("ls", x, t, train, k, **kw)


def els_score(x, t, train, k, **kw):
    """ELS: each pixel's circular-padded patch against every fully-inside training patch."""
    return score("els", x, t, train, k, **kw)


def bbels_score(x, t, train, k, **kw):
    """bbELS: ELS in the interior, position-restricted candidates near the zero-padded border."""
    return score("bbels", x, t, train, k, **kw)
