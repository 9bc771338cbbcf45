"""Certified pruning for the sharp, low-noise steps: candidates in blocks, each with a centroid and a
radius, and a softmax that visits only the (query, block) pairs whose weights can matter.

At low noise the softmax over candidates is sharp: on FashionMNIST (class 3, the paper's schedule,
steps t <= 0.45, k <= 11) only 9-26% of the (interior query, candidate) pairs have a logit within 40
of the query's best. For a block of candidates with centroid mu and radius rho = max ||c - mu||, the
triangle inequality bounds every member's distance,

    ||q - a c|| >= ||q - a mu|| - a rho,

hence its logit -||q - a c||^2 / (2 b^2) + log mult(c) from above. A (query, block) pair is skipped
only when that bound lies more than `margin` below a logit already computed for the query, so the
skipped weight is at most M e^-margin of the query's total (M candidates; margin = log M + 30, so at
most e^-30 = 1e-13 of it: below float32's and float64's resolution). The result is the exact softmax
up to float rounding; it is not an approximation.

Blocks come from a k-d tree on the candidates' top principal components (median splits along the
widest coordinate), planned once per index and family (BlockPlan.build, saved in the index); the
explicit candidates (CandidateBlocks.from_plan) are built per sampling run and reused while its
steps run. Candidates are stored explicitly, centred on their mean (as PatchIndex.materialize does:
small logits, little float32 cancellation), in block order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .softmax import RunningSoftmax, SoftmaxStats

PRINCIPAL_COMPONENTS = 16  # coordinates the k-d tree splits on
LEAF_SIZE = 2048  # candidates per block (the tree splits at the median until a node is this small)
EXTRA_MARGIN = 30.0  # margin = log M + this: the skipped weight is at most e^-30 of the total
SLACK = 1e-6  # relative widening of radii and boxes: covers rounding the candidates to float32


def _kd_leaves(coords: torch.Tensor, leaf: int) -> tuple[torch.Tensor, list[int]]:
    """Order rows of coords [M, r] into leaves of at most `leaf` rows by median splits along each
    node's widest coordinate (judged on a subsample). Returns the order and the leaf starts
    (deterministic: stable sorts, fixed subsamples)."""
    M = coords.shape[0]
    order = torch.arange(M)
    stack, starts = [(0, M)], []
    while stack:
        s, e = stack.pop()
        if e - s <= leaf:
            starts.append(s)
            continue
        idx = order[s:e]
        sub = coords[idx[:: max(1, (e - s) // 4096)]]
        dim = int((sub.amax(0) - sub.amin(0)).argmax())
        order[s:e] = idx[torch.argsort(coords[idx, dim], stable=True)]
        mid = s + (e - s) // 2
        stack += [(mid, e), (s, mid)]
    starts.sort()
    return order, starts


@dataclass
class BlockPlan:
    """How a one-group family's candidates are ordered into blocks and what bounds each block: built
    once with the index (PatchIndex.build) and saved in it. All float64, in coordinates centred on
    the candidates' mean mu [D]: order [M] (block order -> candidate id), starts [nb + 1],
    centroids [nb, D], radii [nb], basis [D, r] (top principal directions), lo, hi [nb, r] (each
    block's box in them), res_centroids [nb, D], res_radii [nb] (the part outside them),
    max_log_mult [nb]. Radii and boxes are widened by SLACK so that they hold for the candidates
    rounded to any float dtype."""

    order: torch.Tensor
    starts: torch.Tensor
    centroids: torch.Tensor
    radii: torch.Tensor
    basis: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    res_centroids: torch.Tensor
    res_radii: torch.Tensor
    max_log_mult: torch.Tensor
    mu: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> BlockPlan:
        return cls(**tensors)

    @classmethod
    def build(
        cls,
        centred: torch.Tensor,
        mu: torch.Tensor,
        log_mult: torch.Tensor | None,
        leaf: int | None = None,
    ) -> BlockPlan:
        """centred [M, D] (float32 or float64): the candidates minus their mean mu [D];
        log_mult [M] (float64) or None."""
        M, D = centred.shape
        # top principal directions of the candidates, as the softmax weighs them (multiplicities)
        if log_mult is None:
            cov = centred.t() @ centred
        else:
            cov = (centred * torch.exp(log_mult).to(centred.dtype).unsqueeze(1)).t() @ centred
        r = min(PRINCIPAL_COMPONENTS, D)
        basis = torch.linalg.eigh(cov.double())[1][:, -r:].contiguous()
        order, starts = _kd_leaves(centred @ basis.to(centred.dtype), leaf or LEAF_SIZE)
        nb = len(starts)
        bounds = starts + [M]
        f64 = dict(dtype=torch.float64)
        centroids, res_centroids = torch.empty(nb, D, **f64), torch.empty(nb, D, **f64)
        radii, res_radii = torch.empty(nb, **f64), torch.empty(nb, **f64)
        lo, hi = torch.empty(nb, r, **f64), torch.empty(nb, r, **f64)
        max_lm = torch.zeros(nb, **f64)
        for j in range(nb):
            ids = order[bounds[j] : bounds[j + 1]]
            block = centred[ids].double()
            slack = SLACK * (1.0 + block.norm(dim=1).max())
            centroids[j] = block.mean(0)
            radii[j] = (block - centroids[j]).norm(dim=1).max() + slack
            z = block @ basis
            lo[j], hi[j] = z.amin(0) - slack, z.amax(0) + slack
            res = block - z @ basis.t()  # the part outside the principal subspace
            res_centroids[j] = res.mean(0)
            res_radii[j] = (res - res_centroids[j]).norm(dim=1).max() + slack
            if log_mult is not None:
                max_lm[j] = log_mult[ids].max()
        return cls(
            order=order,
            starts=torch.tensor(bounds, dtype=torch.long),
            centroids=centroids,
            radii=radii,
            basis=basis,
            lo=lo,
            hi=hi,
            res_centroids=res_centroids,
            res_radii=res_radii,
            max_log_mult=max_lm,
            mu=mu.double(),
        )


def _ids_ascending_in_blocks(order: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """order (a permutation of the candidate ids) with each block's ids sorted."""
    M = order.shape[0]
    block = torch.repeat_interleave(torch.arange(starts.shape[0] - 1), starts[1:] - starts[:-1])
    return torch.sort(block * M + order).values % M


@dataclass
class CandidateBlocks:
    """A BlockPlan with the candidates themselves, on the sampling device and dtype: cand_t [D, M]
    (c - mu in block order), centres_t [E + 1, M] (centre pixel(s), then ones), sq_norms [M]
    (||c - mu||^2), log_mult [M] or None. Built per sampling run (PatchIndex.candidate_blocks)."""

    plan: BlockPlan
    cand_t: torch.Tensor
    centres_t: torch.Tensor
    sq_norms: torch.Tensor
    log_mult: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.cand_t.shape[1]

    @staticmethod
    def nbytes(M: int, D: int, E: int, dtype: torch.dtype) -> int:
        """Memory a CandidateBlocks keeps (it is filled in place, slice by slice)."""
        elt = torch.finfo(dtype).bits // 8
        return M * (D + E + 3) * elt

    @classmethod
    def from_plan(
        cls,
        plan: BlockPlan,
        candidate_rows,
        centre_index: torch.Tensor,
        log_mult: torch.Tensor | None,
        dtype: torch.dtype,
        device,
    ) -> CandidateBlocks:
        """candidate_rows(ids) -> the candidates with these ids, [m, D] float64; centre_index: the
        positions of the centre pixel(s) in a candidate row; log_mult [M] or None (id order)."""
        # within each block the candidates in id order (the softmax's provenance takes the first of
        # exactly tied logits as the smallest id: RunningSoftmax.fold); bounds do not depend on it
        plan = dataclasses.replace(plan, order=_ids_ascending_in_blocks(plan.order, plan.starts))
        M, D = plan.order.shape[0], plan.mu.shape[0]
        cand_t = torch.empty(D, M, dtype=dtype, device=device)
        centres_t = torch.ones(centre_index.shape[0] + 1, M, dtype=dtype, device=device)
        sq = torch.empty(M, dtype=dtype, device=device)
        mu = plan.mu.to(device)
        # in slices of block order (never a second full-size copy) of 4096 candidates: the float64
        # temporaries (2.6 MB at k = 9) then stay in cache (slices of 65536: 2.3x slower)
        step = 1 << 12
        for j in range(0, M, step):
            rows = candidate_rows(plan.order[j : j + step].to(device))
            centred = (rows - mu).to(dtype)
            cand_t[:, j : j + step] = centred.t()
            sq[j : j + step] = centred.double().square().sum(1).to(dtype)
            centres_t[:-1, j : j + step] = rows[:, centre_index].t().to(dtype)
        return cls(
            plan=BlockPlan(**{n: v.to(device) for n, v in plan.tensors().items()}),
            cand_t=cand_t,
            centres_t=centres_t,
            sq_norms=sq,
            log_mult=None
            if log_mult is None
            else log_mult[plan.order].to(device=device, dtype=dtype),
        )

    # ------------------------------------------------------------------------------------ softmax
    def logit_bounds(self, queries: torch.Tensor, a: float, b2: float) -> torch.Tensor:
        """Upper bounds [P, nb] of the logits of queries [P, D] (centred: q - a mu) over each block,
        in the logits' convention (with the ||q||^2 / 2b^2 that cancels in the softmax).

        Two lower bounds on ||q - a c|| for c in a block, the larger one used: the centroid-radius
        one, and the principal-subspace one: the distance from q's coordinates to the block's
        bounding box (scaled by a), combined with the centroid-radius bound of the remainder."""
        q = queries.double()
        q_sq = q.square().sum(1, keepdim=True)

        def gap(sq_dist, radius):
            return (sq_dist.clamp(min=0).sqrt() - a * radius).clamp(min=0)

        pl = self.plan
        whole = gap(
            q_sq - 2 * a * q @ pl.centroids.t() + (a * a) * pl.centroids.square().sum(1), pl.radii
        )
        z = q @ pl.basis  # [P, r]
        lo, hi = a * pl.lo, a * pl.hi
        box = torch.zeros_like(whole)
        for i in range(0, z.shape[0], 64):  # [64, nb, r] at a time
            zi = z[i : i + 64].unsqueeze(1)
            outside = (lo - zi).clamp(min=0) + (zi - hi).clamp(min=0)  # per coordinate
            box[i : i + 64] = outside.square().sum(2)
        res_q = q - z @ pl.basis.t()
        rc = pl.res_centroids
        res_sq = res_q.square().sum(1, keepdim=True) - 2 * a * res_q @ rc.t()
        res = gap(res_sq + (a * a) * rc.square().sum(1), pl.res_radii)
        lower_sq = torch.maximum(whole.square(), box + res.square())
        return (q_sq - lower_sq) / (2 * b2) + pl.max_log_mult

    def softmax_mean(
        self,
        queries: torch.Tensor,
        *,
        a: float,
        b2: float,
        with_stats: bool = False,
        margin: float | None = None,
    ) -> tuple[torch.Tensor, SoftmaxStats | None, float]:
        """Softmax-weighted mean of candidate centres for the queries [P, D] of ONE image (not yet
        centred). Returns mean [P, E], SoftmaxStats [1, P] fields or None, and the fraction of
        (query, candidate) pairs visited."""
        P, D = queries.shape
        dtype, device = queries.dtype, queries.device
        q = queries - a * self.plan.mu.to(dtype)
        margin = math.log(self.count) + EXTRA_MARGIN if margin is None else margin
        ub = self.logit_bounds(q, a, b2)  # [P, nb] float64
        nb = ub.shape[1]
        alpha, norm_coef = a / b2, -(a * a) / (2.0 * b2)
        starts = self.plan.starts.tolist()
        ids = self.plan.order

        def bias_of(j: int) -> torch.Tensor:
            s, e = starts[j], starts[j + 1]
            bias = self.sq_norms[s:e] * norm_coef
            if self.log_mult is not None:
                bias = bias + self.log_mult[s:e]
            return bias

        def products_of(j: int, rows: torch.Tensor | None) -> torch.Tensor:
            qq = q if rows is None else q.index_select(0, rows)
            return qq @ self.cand_t[:, starts[j] : starts[j + 1]]

        # a logit each query certainly reaches: its best candidate in the block of its best bound
        best_block = ub.argmax(1)
        seed = torch.full((P,), float("-inf"), dtype=torch.float64, device=device)
        for j in torch.unique(best_block).tolist():
            rows = (best_block == j).nonzero().squeeze(1)
            logits = products_of(j, rows).mul_(alpha).add_(bias_of(j))
            seed[rows] = logits.amax(1).double()
        keep = ub >= (seed - margin).unsqueeze(1)  # [P, nb]

        E = self.centres_t.shape[0] - 1
        state = RunningSoftmax.start(1, P, E, dtype, device, with_stats)
        visited = 0
        for j in range(nb):
            col = keep[:, j]
            n_rows = int(col.sum())
            if n_rows == 0:
                continue
            rows = None if n_rows == P else col.nonzero().squeeze(1)
            s, e = starts[j], starts[j + 1]
            visited += n_rows * (e - s)
            part = state if rows is None else state.rows(rows)
            part.fold_products(
                products_of(j, rows).unsqueeze(0),
                bias_of(j).unsqueeze(0),
                alpha,
                self.centres_t[None, :, s:e],
                None if self.log_mult is None else self.log_mult[None, s:e],
                ids[s:e],
            )
            if rows is not None:
                state.put(rows, part)
        mean, stats = state.result()
        return mean[0], stats, visited / (P * self.count)
