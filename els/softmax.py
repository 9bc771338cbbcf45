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

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# exp() of arguments below about -87 (float32) takes a slow path, 8x slower on these CPUs; a relative
# weight of e^-80 = 2e-35 is below the rounding of any float sum, so logits are floored there.
EXP_FLOOR = -80.0


class Workspace:
    """Reusable flat buffers for the per-chunk temporaries (logits, unfolded candidates).

    A chunk's temporaries are megabytes each; allocated afresh for every chunk, glibc hands such blocks
    back to the OS on free and the next chunk pays page faults to get them again: measured 30% of a
    FashionMNIST sample's time (102.6 s -> 70.3 s with allocator tuning that keeps them). One workspace
    per denoise call keeps one buffer per role instead. A buffer is valid until the next take() of its
    role: chunks built in a workspace must be consumed before the next one is requested."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous tensor of `shape` (uninitialised), backed by the role's buffer."""
        n = math.prod(shape)
        buf = self._buffers.get(role)
        if (
            buf is None
            or buf.numel() < n
            or buf.dtype != dtype
            or buf.device != torch.device(device)
        ):
            buf = torch.empty(n, dtype=dtype, device=device)
            self._buffers[role] = buf
        return buf[:n].view(shape)


@dataclass
class CandidateChunk:
    """One chunk of candidates for every group: patches_t [G, D, M] (candidates as columns: the layout
    the logits' product reads fastest), their centres with a row of ones below [G, E + 1, M] (one
    product then gives the weighted sums and the normaliser), squared norms [G, M], optional log
    multiplicities [G, M] (-inf marks padding), the id of the first candidate.
    dots [G, P, M]: the query-candidate dot products when the chunk producer computed them itself
    (PatchIndex.dot_chunks); patches_t is then None."""

    patches_t: torch.Tensor | None
    centres_t: torch.Tensor
    sq_norms: torch.Tensor
    log_mult: torch.Tensor | None
    first_id: int
    dots: torch.Tensor | None = None


@dataclass
class SoftmaxStats:
    """Per query: the dominant candidate (id, weight) and the effective number of candidates."""

    best_id: torch.Tensor  # long [G, P]
    best_weight: torch.Tensor  # [G, P]
    n_eff: torch.Tensor  # 1 / sum w^2, [G, P]


class _QueryBlock:
    """The running softmax state of one block of queries [G, P, D] (one image of a batch): running
    max, running weighted sum of centres and normaliser, and the provenance statistics."""

    def __init__(self, queries: torch.Tensor, with_stats: bool, workspace: Workspace):
        G, P, _ = queries.shape
        dtype, device = queries.dtype, queries.device
        self.queries, self.with_stats, self.workspace = queries, with_stats, workspace
        self.run_max = torch.full((G, P), float("-inf"), dtype=dtype, device=device)
        self.acc = None  # [G, E + 1, P]: weighted sums of centres, then the sum of weights
        if with_stats:
            self.sq = torch.zeros((G, P), dtype=dtype, device=device)
            self.best_logit = torch.full((G, P), float("-inf"), dtype=dtype, device=device)
            self.best_id = torch.zeros((G, P), dtype=torch.long, device=device)

    def update(self, chunk: CandidateChunk, bias: torch.Tensor, alpha: float, dots) -> None:
        # logits [G, P, M] = alpha * q.c + bias, in one batched GEMM
        G, P, _ = self.queries.shape
        out = self.workspace.take("logits", (G, P, bias.shape[1]), bias.dtype, bias.device)
        if dots is not None:
            logits = torch.add(bias.unsqueeze(1), dots, alpha=alpha, out=out)
        else:
            logits = torch.baddbmm(
                bias.unsqueeze(1), self.queries, chunk.patches_t, alpha=alpha, out=out
            )
        if self.with_stats:
            # the dominant candidate is a single training patch: compare logits without multiplicity
            single = logits if chunk.log_mult is None else logits - chunk.log_mult.unsqueeze(1)
            single_max, single_arg = single.max(dim=2)
            chunk_max = single_max if chunk.log_mult is None else logits.amax(dim=2)
            better = single_max > self.best_logit  # strict: ties keep the earliest candidate
            self.best_logit = torch.where(better, single_max, self.best_logit)
            self.best_id = torch.where(better, single_arg + chunk.first_id, self.best_id)
        else:
            chunk_max = logits.amax(dim=2)
        new_max = torch.maximum(self.run_max, chunk_max)
        # clamp keeps exp(-inf - -inf) = nan away while a group has seen only padding
        safe_max = new_max.clamp(min=torch.finfo(logits.dtype).min)
        weights = logits.sub_(safe_max.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_()
        rescale = torch.exp(self.run_max - safe_max)
        # [G, E + 1, M] x [G, M, P]: with the candidates as the long inner dimension this product is
        # several times faster than weights [G, P, M] x [G, M, E + 1] (a narrow, memory-bound one)
        contrib = torch.bmm(chunk.centres_t, weights.transpose(1, 2))
        self.acc = contrib if self.acc is None else self.acc * rescale.unsqueeze(1) + contrib
        if self.with_stats:
            # sum of squared weights over individual candidates: a group of n copies adds n w^2
            sq = weights.square()
            if chunk.log_mult is not None:
                inv_mult = torch.exp(-chunk.log_mult).nan_to_num(posinf=0.0)  # padding: 0
                sq = sq * inv_mult.unsqueeze(1)
            self.sq = self.sq * rescale * rescale + sq.sum(dim=2)
        self.run_max = new_max

    def result(self) -> tuple[torch.Tensor, SoftmaxStats | None]:
        run_sum = self.acc[:, -1]
        mean = (self.acc[:, :-1] / run_sum.unsqueeze(1)).transpose(1, 2)
        if not self.with_stats:
            return mean, None
        return mean, SoftmaxStats(
            best_id=self.best_id,
            best_weight=torch.exp(self.best_logit - self.run_max) / run_sum,
            n_eff=run_sum.square() / self.sq,
        )


def streaming_softmax_mean(
    queries: torch.Tensor,
    chunks: Iterable[CandidateChunk],
    *,
    a: float,
    b2: float,
    with_stats: bool = False,
    rows_per_image: int | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, SoftmaxStats | None]:
    """Weighted mean of candidate centres for queries [G, P, D].

    Returns the mean [G, P, E] and, if asked, SoftmaxStats. Works on any device; nothing leaves the
    device inside the loop. rows_per_image: the queries of each group are consecutive blocks of this
    many rows, one block per image of a batch; every operation then runs per block, on tensors of the
    shapes of a batch of one, so that batching images cannot change any image's float rounding (BLAS
    kernels pick their summation order from the shapes, and vectorised exp differs from the scalar
    one used for a tensor's last elements). The candidate chunks are shared by the blocks.
    """
    P = queries.shape[1]
    step = P if rows_per_image is None else rows_per_image
    alpha = a / b2
    norm_coef = -(a * a) / (2.0 * b2)
    # contiguous: each block's layout is then exactly that of a batch of one
    blocks = [
        _QueryBlock(queries[:, s : s + step].contiguous(), with_stats, workspace)
        for s in range(0, P, step)
    ]
    empty = True
    for chunk in chunks:
        empty = False
        bias = chunk.sq_norms * norm_coef
        if chunk.log_mult is not None:
            bias = bias + chunk.log_mult
        for i, block in enumerate(blocks):
            dots = None if chunk.dots is None else chunk.dots[:, i * step : (i + 1) * step]
            block.update(chunk, bias, alpha, dots)
    if empty:
        raise ValueError("no candidates: the candidate set of a query group is empty")
    results = [block.result() for block in blocks]
    mean = torch.cat([m for m, _ in results], dim=1)
    stats = None
    if with_stats:
        stats = SoftmaxStats(
            *(
                torch.cat([getattr(st, f) for _, st in results], dim=1)
                for f in SoftmaxStats.__dataclass_fields__
            )
        )
    return mean, stats
