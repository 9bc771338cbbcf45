"""The four score machines: ideal (IS), local (LS), equivariant local (ELS), boundary-broken ELS (bbELS).

Each machine computes, per pixel, the softmax-weighted mean of candidate centres (the denoised image m,
the machine's estimate of E[x_0 | x_t]); the score is s = -(x - a_t m) / b_t^2. Which candidates compete
for which pixel is the machine's PatchIndex; the arithmetic is els.softmax.streaming_softmax_mean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .index import MACHINES, PatchIndex, PatchIndexError, query_padding
from .schedule import noise_scale, signal_scale
from .softmax import SoftmaxStats, Workspace, streaming_softmax_mean

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of chunk temporaries (logits, unfolded candidates)
# steps with t at most this use certified pruning (els.blocks) for the one-group interior family
# where the index has a block plan: there the softmax is sharp (FashionMNIST: 9-26% of the pairs
# within 40 of the best logit at t <= 0.45); above, most pairs matter and dense chunks are faster
PRUNE_BELOW_T = 0.5
# logits per chunk on a CPU: small enough to stay in cache between the product, the exp and the sums
# (on a GPU only the memory budget bounds a chunk: fewer, larger kernels)
MAX_CHUNK_LOGITS = 2**21


@dataclass
class Provenance:
    """Per pixel [B, H, W]: the dominant candidate's training image, the row and column of its patch
    centre in that image, its softmax weight, and the effective number of candidates 1 / sum w^2."""

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    weight: torch.Tensor
    n_eff: torch.Tensor


def _check_time(t: float) -> None:
    if not 0.0 < float(t) < 1.0:
        raise ValueError(f"t={t} is outside (0, 1): the score is defined for 0 < t < 1")


def _centred_queries(index: PatchIndex, fam, queries: torch.Tensor, a: float) -> torch.Tensor:
    """Materialised candidates are centred on mu (see PatchIndex.materialize): q -> q - a mu."""
    mat = index.materialized(fam)
    if mat is None:
        return queries
    mu = mat[4]
    return queries - a * mu.unsqueeze(1)


def _chunk_candidates(
    index: PatchIndex,
    groups: int,
    queries: int,
    dim: int,
    centre: int,
    dtype,
    budget: int,
    fam=None,
    device=None,
) -> int:
    """Candidates per group per chunk from the memory budget and (on a CPU) a cache-sized logits
    block, for the queries of ONE image: chunks never depend on the batch size, so batching seeds
    cannot change a seed's float rounding (denoise splits a batch whose logits would not fit the
    budget instead)."""
    elt = torch.finfo(dtype).bits // 8
    if fam is not None and index.materialized(fam) is not None:
        dim = 0  # chunks are views of the materialised candidates: only logits and weights
    # per candidate and group: unfolded patch (twice: unfold then gather), logits and weights, centres
    per_candidate = elt * groups * (2 * dim + 2 * queries + centre)
    by_budget = max(1, budget // per_candidate)
    if device is not None and torch.device(device).type != "cpu":
        return by_budget
    by_cache = max(1, MAX_CHUNK_LOGITS // max(1, groups * queries))
    # the implicit chunks hold whole images: never fewer candidates than one image's positions
    return max(min(by_budget, by_cache), 1)


def _images_per_block(index: PatchIndex, x: torch.Tensor, budget: int) -> int:
    """How many images of a batch fit the budget together: the logits of one image's queries against
    one candidate chunk, times two (logits and weights), for the hungriest family."""
    elt = torch.finfo(x.dtype).bits // 8
    C, H, W = x.shape[1:]
    worst = 1
    for fam in index.families:
        G, per_group = (1, 1) if index.machine == "ideal" else fam.query_pos.shape
        D = C * H * W if index.machine == "ideal" else C * index.k * index.k
        E = D if index.machine == "ideal" else C
        step = _chunk_candidates(index, G, per_group, D, E, x.dtype, budget, fam, x.device)
        worst = max(worst, 2 * elt * G * per_group * max(step, fam.positions_per_image))
    return max(1, budget // worst)


def _prunes(
    index: PatchIndex, fam, t: float, prune_below_t: float, dtype, budget: int, device
) -> bool:
    """Whether this family's softmax at t runs on candidate blocks (see PRUNE_BELOW_T). CPU only:
    the block loop decides per block which queries to visit, a host round-trip per block on a GPU
    (where the dense chunks stay on the device)."""
    return (
        t <= prune_below_t
        and torch.device(device).type == "cpu"
        and index.machine in ("els", "bbels")
        and index.block_plan(fam) is not None
        and index.blocks_bytes(fam, dtype) <= budget // 2
    )


def _pruned_softmax_mean(blocks, queries: torch.Tensor, *, a, b2, batch: int, with_stats: bool):
    """CandidateBlocks.softmax_mean per image of the batch; queries [1, B*P, D] -> mean [1, B*P, E]
    and stats as streaming_softmax_mean gives them."""
    P = queries.shape[1] // batch
    parts = [
        blocks.softmax_mean(queries[0, i * P : (i + 1) * P], a=a, b2=b2, with_stats=with_stats)
        for i in range(batch)
    ]
    mean = torch.cat([p[0] for p in parts]).unsqueeze(0)
    if not with_stats:
        return mean, None
    fields = SoftmaxStats.__dataclass_fields__
    return mean, SoftmaxStats(*(torch.cat([getattr(p[1], f) for p in parts], 1) for f in fields))


def _group_major_to_batch(v: torch.Tensor, batch: int) -> torch.Tensor:
    G = v.shape[0]
    return v.view(G, batch, -1).permute(1, 0, 2).reshape(batch, -1)


@contextlib.contextmanager
def full_float32(device):
    """IEEE float32 in the GPU's matrix products and convolutions while the block runs. cuDNN
    convolutions default to TF32 (10 mantissa bits; products too after
    torch.set_float32_matmul_precision('high')): measured 7e-4 relative error on a float32 sample,
    where the CPU's float32 gives 1e-6. cuDNN is also held to deterministic algorithms, so that
    reruns give identical files. Restores the caller's settings; nothing changes on a CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=False,
            deterministic=True,
            allow_tf32=False,
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def denoise(
    index: PatchIndex,
    x: torch.Tensor,
    t: float,
    *,
    memory_budget: int | None = None,
    return_provenance: bool = False,
    prune_below_t: float = PRUNE_BELOW_T,
):
    """The machine's denoised image m(x, t) [B, C, H, W] (and Provenance if asked).

    prune_below_t: at t <= this, the interior family's softmax visits only the candidate blocks
    whose weight can matter (els.blocks: exact up to float rounding; where the index has a block plan
    and the explicit blocks fit in half the memory budget); 0 turns it off.
    On a GPU the arithmetic is IEEE float32 (or float64), never TF32 (see full_float32)."""
    with full_float32(x.device):
        return _denoise(
            index,
            x,
            t,
            memory_budget=memory_budget,
            return_provenance=return_provenance,
            prune_below_t=prune_below_t,
        )


def _denoise(
    index: PatchIndex,
    x: torch.Tensor,
    t: float,
    *,
    memory_budget: int | None,
    return_provenance: bool,
    prune_below_t: float,
):
    _check_time(t)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != tuple(index.images.shape[1:]):
        raise ValueError(
            f"x has image shape {tuple(x.shape[1:])}, the training set "
            f"{tuple(index.images.shape[1:])}"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    budget = memory_budget or DEFAULT_MEMORY_BUDGET
    if x.is_cuda:
        budget = min(budget, int(torch.cuda.mem_get_info(x.device)[0] * 0.6))
    block = _images_per_block(index, x, budget)
    if x.shape[0] > block:
        parts = [
            _denoise(
                index,
                x[i : i + block],
                t,
                memory_budget=budget,
                return_provenance=return_provenance,
                prune_below_t=prune_below_t,
            )
            for i in range(0, x.shape[0], block)
        ]
        if not return_provenance:
            return torch.cat(parts)
        fields = Provenance.__dataclass_fields__
        return torch.cat([p[0] for p in parts]), Provenance(
            *(torch.cat([getattr(p[1], f) for p in parts]) for f in fields)
        )
    a, b = signal_scale(t), noise_scale(t)
    b2 = b * b
    B, C, H, W = x.shape
    dtype, device = x.dtype, x.device

    if index.machine == "ideal":
        fam = index.families[0]
        D = C * H * W
        step = _chunk_candidates(index, 1, 1, D, D, dtype, budget, fam, device)
        workspace = Workspace()
        mean, stats = streaming_softmax_mean(
            _centred_queries(index, fam, x.reshape(1, B, D), a),
            index.chunks(fam, dtype, device, step, workspace),
            a=a,
            b2=b2,
            with_stats=return_provenance,
            rows_per_image=1,
            workspace=workspace,
        )
        m = mean.reshape(B, C, H, W)
        if not return_provenance:
            return m
        image, _, _ = index.source_of(fam, stats.best_id)
        rows = torch.arange(H, device=device).view(1, H, 1).expand(B, H, W)
        cols = torch.arange(W, device=device).view(1, 1, W).expand(B, H, W)
        per_pixel = lambda v: v.reshape(B, 1, 1).expand(B, H, W)  # noqa: E731
        prov = Provenance(
            per_pixel(image), rows, cols, per_pixel(stats.best_weight), per_pixel(stats.n_eff)
        )
        return m, prov

    k, d = index.k, index.k // 2
    D = C * k * k
    padded = F.pad(x, (d, d, d, d), mode=query_padding(index.machine)) if d else x
    query_cols = F.unfold(padded, k)  # [B, D, H*W]: the patch centred on every pixel
    m = x.new_empty(B, C, H * W)
    workspace = Workspace()  # chunk temporaries, reused across chunks and families
    if return_provenance:
        prov_maps = {n: torch.zeros(B, H * W, dtype=torch.long, device=device) for n in "irc"}
        weight = x.new_zeros(B, H * W)
        n_eff = x.new_zeros(B, H * W)
    for fam in index.families:
        G, per_group = fam.query_pos.shape
        pos = fam.query_pos.to(device).reshape(-1)
        queries = query_cols[:, :, pos].view(B, D, G, per_group).permute(2, 0, 3, 1)
        queries = queries.reshape(G, B * per_group, D)
        step = _chunk_candidates(index, G, per_group, D, C, dtype, budget, fam, device)
        if _prunes(index, fam, t, prune_below_t, dtype, budget, device):
            mean, stats = _pruned_softmax_mean(
                index.candidate_blocks(fam, dtype, device),
                queries,
                a=a,
                b2=b2,
                batch=B,
                with_stats=return_provenance,
            )
        else:
            if index.computes_own_dots(fam):
                chunks = index.dot_chunks(fam, queries, x, step)
            else:
                queries = _centred_queries(index, fam, queries, a)
                chunks = index.chunks(fam, dtype, device, step, workspace)
            mean, stats = streaming_softmax_mean(
                queries,
                chunks,
                a=a,
                b2=b2,
                with_stats=return_provenance,
                rows_per_image=per_group,
                workspace=workspace,
            )
        # [G, B*P, C] -> [B, C, G*P], the order of pos
        m[:, :, pos] = mean.view(G, B, per_group, C).permute(1, 3, 0, 2).reshape(B, C, -1)
        if return_provenance:
            # [G, B*P] -> [B, G*P], the order of pos
            sources = index.source_of(fam, stats.best_id)
            for key, v in zip("irc", sources, strict=True):
                prov_maps[key][:, pos] = _group_major_to_batch(v, B)
            weight[:, pos] = _group_major_to_batch(stats.best_weight, B)
            n_eff[:, pos] = _group_major_to_batch(stats.n_eff, B)
    m = m.view(B, C, H, W)
    if not return_provenance:
        return m
    shape = (B, H, W)
    prov = Provenance(
        prov_maps["i"].view(shape),
        prov_maps["r"].view(shape),
        prov_maps["c"].view(shape),
        weight.view(shape),
        n_eff.view(shape),
    )
    return m, prov


def score_from_denoised(x: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
    """s = -(x - a_t m) / b_t^2."""
    a, b = signal_scale(t), noise_scale(t)
    return -(x - a * denoised) / (b * b)


def _index_for(kind: str, train: torch.Tensor | None, k: int | None, index: PatchIndex | None):
    if kind not in MACHINES:
        raise PatchIndexError(f"unknown machine {kind!r}; expected one of {', '.join(MACHINES)}")
    if index is not None:
        index.check(kind, index.k if k is None else k)
        return index
    if train is None:
        raise ValueError("give the training images (train) or a prebuilt PatchIndex (index)")
    if kind != "ideal" and k is None:
        raise PatchIndexError(f"machine {kind!r} needs a patch size k")
    # a one-off call: deduplication and block plans would cost more than they save
    return PatchIndex.build(train, kind, k, dedup=False, blocks=False)


def score(
    kind: str,
    x: torch.Tensor,
    t: float,
    train: torch.Tensor | None = None,
    k: int | None = None,
    *,
    index: PatchIndex | None = None,
    memory_budget: int | None = None,
    **zoo_options,
) -> torch.Tensor:
    """s(x, t) of machine `kind` ('ideal', 'ls', 'els', 'bbels'), shape of x.

    train: [N, C, H, W] uint8 (8-bit images) or float in [-1, 1]; k: odd patch size (ignored by 'ideal').
    Pass a prebuilt `index` to reuse candidate work across calls.
    The training-free denoisers (els.zoo.ZOO_KINDS) take their parameters as zoo_options.
    """
    from . import zoo

    if kind in zoo.ZOO_KINDS:
        return zoo.score(kind, x, t, train, k, memory_budget=memory_budget, **zoo_options)
    if zoo_options:
        raise TypeError(f"machine {kind!r} takes no option {', '.join(sorted(zoo_options))}")
    idx = _index_for(kind, train, k, index)
    m = denoise(idx.to(x.device), x, t, memory_budget=memory_budget)
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
