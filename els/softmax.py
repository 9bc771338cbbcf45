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
On a CPU the fold of a chunk into that state runs compiled, one pass per query row (els.native);
on a GPU (float32) Triton kernels compute the products, weights and sums together without writing
the logits to memory (els.fused). RunningSoftmax.fold is the torch version of the same arithmetic
(float64 on a GPU, CPUs without a compiler, GPUs without triton).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import fused, native

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


@dataclass
class RunningSoftmax:
    """The running state of a streaming softmax for queries [G, P]: running max, the weighted sums of
    centres with the normaliser below them acc [G, E + 1, P], and, for provenance, the dominant
    candidate's logit and id and the running sum of squared weights (None without stats)."""

    run_max: torch.Tensor
    acc: torch.Tensor
    best_logit: torch.Tensor | None = None
    best_id: torch.Tensor | None = None
    sq: torch.Tensor | None = None

    @classmethod
    def start(cls, G: int, P: int, E: int, dtype, device, with_stats: bool) -> RunningSoftmax:
        state = cls(
            torch.full((G, P), float("-inf"), dtype=dtype, device=device),
            torch.zeros((G, E + 1, P), dtype=dtype, device=device),
        )
        if with_stats:
            state.best_logit = torch.full((G, P), float("-inf"), dtype=dtype, device=device)
            state.best_id = torch.zeros((G, P), dtype=torch.long, device=device)
            state.sq = torch.zeros((G, P), dtype=dtype, device=device)
        return state

    def rows(self, idx: torch.Tensor) -> RunningSoftmax:
        """The state of the queries idx (a copy)."""
        return RunningSoftmax(
            *(
                None if v is None else v.index_select(2 if n == "acc" else 1, idx)
                for n, v in vars(self).items()
            )
        )

    def put(self, idx: torch.Tensor, part: RunningSoftmax) -> None:
        """Write back the state of the queries idx (see rows)."""
        for n, v in vars(self).items():
            if v is not None:
                v.index_copy_(2 if n == "acc" else 1, idx, getattr(part, n))

    def fold(
        self,
        logits: torch.Tensor,
        centres_t: torch.Tensor,
        log_mult: torch.Tensor | None,
        ids: torch.Tensor | None,
    ) -> None:
        """Fold one chunk in: logits [G, P, M] (overwritten), centres_t [G, E + 1, M], log
        multiplicities [G, M] or None, the candidates' ids [M], ascending (needed with stats)."""
        if self.best_logit is not None:
            # the dominant candidate is a single training patch: compare logits without
            # multiplicity; among exact ties the smallest id (the first occurrence): max() returns
            # the first maximal position, the smallest id as ids ascend
            # (padding: -inf - -inf is nan, which max() would return: -inf instead)
            single = logits
            if log_mult is not None:
                single = (logits - log_mult.unsqueeze(1)).nan_to_num_(
                    nan=float("-inf"), neginf=float("-inf")
                )
            single_max, arg = single.max(dim=2)
            chunk_max = single_max if log_mult is None else logits.amax(dim=2)
            first = ids[arg]
            better = (single_max > self.best_logit) | (
                (single_max == self.best_logit) & (first < self.best_id)
            )
            self.best_logit = torch.where(better, single_max, self.best_logit)
            self.best_id = torch.where(better, first, self.best_id)
        else:
            chunk_max = logits.amax(dim=2)
        new_max = torch.maximum(self.run_max, chunk_max)
        # clamp keeps exp(-inf - -inf) = nan away while a group has seen only padding
        safe_max = new_max.clamp(min=torch.finfo(logits.dtype).min)
        weights = logits.sub_(safe_max.unsqueeze(2)).clamp_(min=EXP_FLOOR).exp_()
        rescale = torch.exp(self.run_max - safe_max)
        # [G, E + 1, M] x [G, M, P]: with the candidates as the long inner dimension this product is
        # several times faster than weights [G, P, M] x [G, M, E + 1] (a narrow, memory-bound one)
        contrib = torch.bmm(centres_t, weights.transpose(1, 2))
        self.acc = self.acc * rescale.unsqueeze(1) + contrib
        if self.sq is not None:
            # sum of squared weights over individual candidates: a group of n copies adds n w^2
            sq = weights.square()
            if log_mult is not None:
                inv_mult = torch.exp(-log_mult).nan_to_num(posinf=0.0)  # padding: 0
                sq = sq * inv_mult.unsqueeze(1)
            self.sq = self.sq * rescale * rescale + sq.sum(dim=2)
        self.run_max = new_max

    def fold_products(
        self,
        products: torch.Tensor,
        bias: torch.Tensor,
        alpha: float,
        centres_t: torch.Tensor,
        log_mult: torch.Tensor | None,
        ids: torch.Tensor | None,
    ) -> None:
        """fold() of the logits alpha * products + bias: products [G, P, M] (the query-candidate
        dot products, rows contiguous; overwritten), bias [G, M] (log multiplicities included).
        On a CPU the compiled fold (els.native) does it in one pass per query row."""
        if native.usable(products, centres_t.shape[1] - 1):
            native.fold_module().fold_chunk(
                products,
                bias,
                alpha,
                centres_t,
                log_mult,
                ids,
                self.run_max,
                self.acc,
                self.best_logit,
                self.best_id,
                self.sq,
            )
            return
        logits = products.mul_(alpha).add_(bias.unsqueeze(1))
        self.fold(logits, centres_t, log_mult, ids)

    def result(self) -> tuple[torch.Tensor, SoftmaxStats | None]:
        """mean [G, P, E] and, with stats, SoftmaxStats."""
        run_sum = self.acc[:, -1]
        mean = (self.acc[:, :-1] / run_sum.unsqueeze(1)).transpose(1, 2)
        if self.best_logit is None:
            return mean, None
        return mean, SoftmaxStats(
            best_id=self.best_id,
            best_weight=torch.exp(self.best_logit - self.run_max) / run_sum,
            n_eff=run_sum.square() / self.sq,
        )


class _QueryBlock:
    """One block of queries [G, P, D] (one image of a batch) and its RunningSoftmax."""

    def __init__(self, queries: torch.Tensor, with_stats: bool, workspace: Workspace):
        self.queries, self.with_stats, self.workspace = queries, with_stats, workspace
        self.state: RunningSoftmax | None = None  # started at the first chunk (E is known then)

    def update(self, chunk: CandidateChunk, bias: torch.Tensor, alpha: float, dots) -> None:
        # logits [G, P, M] = alpha * q.c + bias: one batched GEMM, folded into the state
        G, P, _ = self.queries.shape
        M = bias.shape[1]
        if self.state is None:
            E = chunk.centres_t.shape[1] - 1
            self.state = RunningSoftmax.start(G, P, E, bias.dtype, bias.device, self.with_stats)
        ids = None
        if self.with_stats:
            ids = torch.arange(chunk.first_id, chunk.first_id + M, device=bias.device)
        if native.usable(bias, chunk.centres_t.shape[1] - 1):
            # the products alone; the compiled fold adds the bias while a row is in cache
            if dots is None:
                out = self.workspace.take("logits", (G, P, M), bias.dtype, bias.device)
                dots = torch.bmm(self.queries, chunk.patches_t, out=out)
            self.state.fold_products(dots, bias, alpha, chunk.centres_t, chunk.log_mult, ids)
            return
        out = self.workspace.take("logits", (G, P, M), bias.dtype, bias.device)
        if dots is not None:
            logits = torch.add(bias.unsqueeze(1), dots, alpha=alpha, out=out)
        else:
            logits = torch.baddbmm(
                bias.unsqueeze(1), self.queries, chunk.patches_t, alpha=alpha, out=out
            )
        self.state.fold(logits, chunk.centres_t, chunk.log_mult, ids)


def _chunk_bias(chunk: CandidateChunk, norm_coef: float) -> torch.Tensor:
    """The logits' per-candidate term -a^2 ||c||^2 / (2 b^2) + log mult(c), [G, M]."""
    bias = chunk.sq_norms * norm_coef
    return bias if chunk.log_mult is None else bias + chunk.log_mult


def _fused_softmax_mean(queries, first, rest, alpha, norm_coef, with_stats):
    """streaming_softmax_mean by els.fused's kernels: one launch for all rows (row-independent
    arithmetic, so batching still cannot change an image's rounding). None if the kernels cannot
    run on this GPU (the first chunk is then still valid: the caller folds it with torch)."""
    G, P, _ = queries.shape
    E = first.centres_t.shape[1] - 1
    state = RunningSoftmax.start(G, P, E, queries.dtype, queries.device, with_stats)
    for i, chunk in enumerate(itertools.chain([first], rest)):
        bias = _chunk_bias(chunk, norm_coef)
        try:
            fused.fold_chunk(
                state,
                queries,
                chunk.patches_t,
                bias,
                alpha,
                chunk.centres_t,
                chunk.log_mult,
                chunk.first_id,
            )
        except Exception as err:  # compilation or launch (shared memory, an older GPU): torch
            if i > 0:  # the kernels ran on this GPU before: not a question of support
                raise
            fused.turn_off(f"{type(err).__name__}: {str(err).strip()[:200]}")
            return None
    return state.result()


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
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        raise ValueError("no candidates: the candidate set of a query group is empty")
    E = first.centres_t.shape[1] - 1
    if first.dots is None and fused.usable(queries, E):
        result = _fused_softmax_mean(queries, first, chunks, alpha, norm_coef, with_stats)
        if result is not None:
            return result
    chunks = itertools.chain([first], chunks)
    # contiguous: each block's layout is then exactly that of a batch of one
    blocks = [
        _QueryBlock(queries[:, s : s + step].contiguous(), with_stats, workspace)
        for s in range(0, P, step)
    ]
    for chunk in chunks:
        bias = _chunk_bias(chunk, norm_coef)
        for i, block in enumerate(blocks):
            dots = None if chunk.dots is None else chunk.dots[:, i * step : (i + 1) * step]
            block.update(chunk, bias, alpha, dots)
    results = [block.state.result() for block in blocks]
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
