"""The hot loop: a softmax-weighted mean of candidate centres, streamed over candidate chunks.

Every machine reduces to this. Queries q (patches of the noisy image) are grouped: the queries of group g
compete over the candidates of group g only. The weight of candidate c for query q is

    w(c) ∝ mult(c) * exp(-||q - a c||^2 / (2 b^2)),

normalised over ALL candidates of the group. Expanding the square, the ||q||^2 term is the same for every
candidate of a query and cancels, so the logit is

    l(q, c) = (a <q, c> - a^2 ||c||^2 / 2) / b^2 + log mult(c),

and the <q, c> for a whole chunk is one batched matrix product. The softmax is a streaming log-sum-exp:
a running max m, running normaliser s and running weighted sum of centres, rescaled by exp(m_old - m_new)
whenever a chunk raises the max. Chunks never average locally, so the result equals one big softmax.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

# exp() of arguments below about -87 (float32) takes a slow path, 8x slower on these CPUs; a relative
# weight of e^-80 = 2e-35 is below the rounding of any float sum, so logits are floored there.
EXP_FLOOR = -80.0


@dataclass
class CandidateChunk:
    """One chunk of candidates for every group: patches [G, M, D], their centres with a column of ones
    appended [G, M, E + 1] (one product then gives the weighted sum and the normaliser), squared norms
    [G, M], optional log multiplicities [G, M] (-inf marks padding), the id of the first candidate."""

    patches: torch.Tensor
    centres_and_ones: torch.Tensor
    sq_norms: torch.Tensor
    log_mult: torch.Tensor | None
    first_id: int


@dataclass
class SoftmaxStats:
    """Per query: the dominant candidate (id, weight) and the effective number of candidates."""

    best_id: torch.Tensor  # long [G, P]
    best_weight: torch.Tensor  # [G, P]
    n_eff: torch.Tensor  # 1 / sum w^2, [G, P]


def _per_rows(product, rows: torch.Tensor, block: int | None) -> torch.Tensor:
    """product(rows) [G, P, ...] computed on blocks of `block` rows (all at once if None)."""
    P = rows.shape[1]
    if block is None or block >= P:
        return product(rows)
    return torch.cat([product(rows[:, s : s + block]) for s in range(0, P, block)], dim=1)


def streaming_softmax_mean(
    queries: torch.Tensor,
    chunks: Iterable[CandidateChunk],
    *,
    a: float,
    b2: float,
    with_stats: bool = False,
    rows_per_image: int | None = None,
) -> tuple[torch.Tensor, SoftmaxStats | None]:
    """Weighted mean of candidate centres for queries [G, P, D].

    Returns the mean [G, P, E] and, if asked, SoftmaxStats. Works on any device; nothing leaves the
    device inside the loop. rows_per_image: the queries of each group are consecutive blocks of this
    many rows, one block per image of a batch; the matrix products then run per block, with the
    shapes of a batch of one, so that batching images cannot change any image's float rounding (BLAS
    kernels pick their blocking, hence their summation order, from the matrix shapes).
    """
    G, P, _ = queries.shape
    dtype, device = queries.dtype, queries.device
    lowest = torch.finfo(dtype).min
    run_max = torch.full((G, P), float("-inf"), dtype=dtype, device=device)
    run_acc = None  # [G, P, E + 1]: weighted sum of centres, then the sum of weights
    if with_stats:
        run_sq = torch.zeros((G, P), dtype=dtype, device=device)
        best_logit = torch.full((G, P), float("-inf"), dtype=dtype, device=device)
        best_id = torch.zeros((G, P), dtype=torch.long, device=device)

    alpha = a / b2
    norm_coef = -(a * a) / (2.0 * b2)
    for chunk in chunks:
        cand = chunk.patches
        bias = chunk.sq_norms * norm_coef
        if chunk.log_mult is not None:
            bias = bias + chunk.log_mult
        # logits [G, P, M] = alpha * q.c + bias, in one batched GEMM (per image of a batch)
        bias_rows, cand_t = bias.unsqueeze(1), cand.transpose(1, 2)
        logits = _per_rows(
            lambda q, bias_rows=bias_rows, cand_t=cand_t: torch.baddbmm(
                bias_rows, q, cand_t, alpha=alpha
            ),
            queries,
            rows_per_image,
        )
        chunk_max = logits.amax(dim=2)
        if with_stats:
            # the dominant candidate is a single training patch: compare logits without multiplicity
            single = logits if chunk.log_mult is None else logits - chunk.log_mult.unsqueeze(1)
            single_max, single_arg = single.max(dim=2)
            better = single_max > best_logit  # strict: ties keep the earliest candidate
            best_logit = torch.where(better, single_max, best_logit)
            best_id = torch.where(better, single_arg + chunk.first_id, best_id)
        new_max = torch.maximum(run_max, chunk_max)
        # clamp keeps exp(-inf - -inf) = nan away while a group has seen only padding
        safe_max = new_max.clamp(min=lowest)
        weights = logits.sub_(safe_max.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_()
        rescale = torch.exp(run_max - safe_max)
        contrib = _per_rows(
            lambda w, c=chunk.centres_and_ones: torch.bmm(w, c), weights, rows_per_image
        )
        run_acc = contrib if run_acc is None else run_acc * rescale.unsqueeze(2) + contrib
        if with_stats:
            # sum of squared weights over individual candidates: a group of n copies adds n w^2
            sq = weights.square()
            if chunk.log_mult is not None:
                inv_mult = torch.exp(-chunk.log_mult).nan_to_num(posinf=0.0)  # padding: 0
                sq = sq * inv_mult.unsqueeze(1)
            run_sq = run_sq * rescale * rescale + sq.sum(dim=2)
        run_max = new_max
    if run_acc is None:
        raise ValueError("no candidates: the candidate set of a query group is empty")
    run_sum = run_acc[:, :, -1]
    mean = run_acc[:, :, :-1] / run_sum.unsqueeze(2)
    stats = None
    if with_stats:
        stats = SoftmaxStats(
            best_id=best_id,
            best_weight=torch.exp(best_logit - run_max) / run_sum,
            n_eff=run_sum.square() / run_sq,
        )
    return mean, stats
