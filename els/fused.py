"""The fused softmax fold for CUDA (Triton): products, exp and weighted sums in one kernel.

On a GPU the torch path writes every chunk's logits [G, P, M] to memory (the matrix product) and then
reads and rewrites them in about seven passes (bias, max, subtract, exp, sums): memory-bound, as an
H100 evaluation at k = 3 spends most of its time there. Here each program takes a block of queries
and a fixed range of candidates, computes the dot products (IEEE float32, never TF32), the running max,
the weights and the weighted centre sums (and, for provenance, the dominant single candidate and the
sum of squared weights) in registers, and writes one partial softmax state per query; a second kernel
merges the ranges into the RunningSoftmax in id order. No logits reach memory.

Batching cannot change an image's rounding: a query's arithmetic depends only on its own row and on
the candidates (fixed block sizes and candidate ranges, whatever the number of rows), and the merge
runs in range order. CUDA and float32 only (float64 and CPUs use the torch fold or els.native);
ELS_FUSED=0 turns it off. With TRITON_INTERPRET=1 set before triton is imported, the same kernels
run on CPU tensors (the CPU tests do this).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings

import torch

MAX_CHANNELS = 8  # centre channels per candidate (the ideal score's are whole images: torch)
BLOCK_M = 64  # queries per program
BLOCK_N = 64  # candidates per inner step
# candidates per program: 4096 fills an H100 at batch 1 (k = 3: ~700 ranges x 15 query blocks) and was
# the fastest of 4096 / 16384 at k = 3, 11 and 17 (benchmarks/gpu_fused_probe.py)
SPLIT = 4096
NUM_WARPS = 4
BLOCK_ROWS = 128  # queries per program of the merge


def enabled() -> bool:
    """Whether the fused fold may be used (ELS_FUSED=0 turns it off)."""
    return os.environ.get("ELS_FUSED", "1") != "0"


_state: dict[str, str] = {}  # "off": why the kernels cannot run in this process


@functools.cache
def _triton_ok() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(t: torch.Tensor, channels: int) -> bool:
    """Whether the fused fold runs for queries like t (CUDA, float32) with this many centre
    channels. On a GPU without triton, or where its kernels failed (see turn_off), the torch fold
    runs, and a warning said why once."""
    if not (
        t.device.type == "cuda"
        and t.dtype == torch.float32
        and channels <= MAX_CHANNELS
        and enabled()
    ):
        return False
    if "off" not in _state and not _triton_ok():
        turn_off("triton is not installed (it comes with torch's CUDA wheels on Linux)")
    return "off" not in _state


def turn_off(reason: str) -> None:
    """Use the torch fold from now on in this process, and say why (once)."""
    if "off" in _state:
        return
    _state["off"] = reason
    warnings.warn(
        f"els: the fused GPU softmax fold is off ({reason}); using the torch fold (same results up "
        "to float rounding, slower). ELS_FUSED=0 turns it off without this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def _get_kernels():
    """The two kernels (els._fused_kernels, imported on first use: importing triton takes a
    second)."""
    from . import _fused_kernels

    return _fused_kernels.partials, _fused_kernels.merge


def fold_chunk(
    state,
    queries: torch.Tensor,
    patches_t: torch.Tensor,
    bias: torch.Tensor,
    alpha: float,
    centres_t: torch.Tensor,
    log_mult: torch.Tensor | None,
    first_id: int,
) -> None:
    """Fold one candidate chunk into a RunningSoftmax `state` (els.softmax) for queries [G, R, D]:
    logits alpha * <q, c> + bias with the candidates patches_t [G, D, M], bias [G, M] (log
    multiplicities included), centres_t [G, E + 1, M] (the row of ones is not read), log_mult [G, M]
    (for the statistics; -inf marks padding) and the chunk's first candidate id."""
    partials, merge = _get_kernels()
    G, R, D = queries.shape
    M = bias.shape[1]
    E = centres_t.shape[1] - 1
    if E > MAX_CHANNELS:
        raise ValueError(f"the fused fold handles at most {MAX_CHANNELS} centre channels, got {E}")
    stats = state.best_logit is not None
    queries = queries.contiguous()
    patches_t = _last_contiguous(patches_t)
    centres_t = _last_contiguous(centres_t)
    bias = bias.contiguous()
    has_mult = stats and log_mult is not None
    lm = _last_contiguous(log_mult) if has_mult else bias
    for name in ("run_max", "acc") + (("best_logit", "best_id", "sq") if stats else ()):
        if not getattr(state, name).is_contiguous():
            setattr(state, name, getattr(state, name).contiguous())
    S = math.ceil(M / SPLIT)
    EP = max(1, 1 << (E - 1).bit_length())
    dev, f32 = queries.device, torch.float32
    part_m = torch.empty((G, S, R), dtype=f32, device=dev)
    part_l = torch.empty((G, S, R), dtype=f32, device=dev)
    part_acc = torch.empty((G, S, EP, R), dtype=f32, device=dev)
    if stats:
        part_best = torch.empty((G, S, R), dtype=f32, device=dev)
        part_id = torch.empty((G, S, R), dtype=torch.long, device=dev)
        part_sq = torch.empty((G, S, R), dtype=f32, device=dev)
    else:  # not read or written without stats
        part_best, part_id, part_sq = part_m, part_m, part_m
    parts = (part_m, part_l, part_acc, part_best, part_id, part_sq)  # one partial state per range
    BD = 16 if D <= 16 else 32
    partials[(math.ceil(R / BLOCK_M), S, G)](
        queries,
        queries.stride(0),
        queries.stride(1),
        patches_t,
        patches_t.stride(0),
        patches_t.stride(1),
        bias,
        bias.stride(0),
        centres_t,
        centres_t.stride(0),
        centres_t.stride(1),
        lm,
        lm.stride(0),
        *parts,
        R,
        M,
        int(first_id),
        float(alpha),
        D=D,
        E=E,
        EP=EP,
        SPLIT=SPLIT,
        BM=BLOCK_M,
        BN=BLOCK_N,
        BD=BD,
        STATS=stats,
        HAS_MULT=has_mult,
        num_warps=NUM_WARPS,
    )
    run_max, acc = state.run_max, state.acc
    best, best_id, sq = (
        (state.best_logit, state.best_id, state.sq) if stats else (run_max, run_max, run_max)
    )
    merge[(math.ceil(R / BLOCK_ROWS), G)](
        run_max,
        acc,
        best,
        best_id,
        sq,
        *parts,
        S,
        R,
        E=E,
        EP=EP,
        BR=BLOCK_ROWS,
        STATS=stats,
    )


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last dimension is contiguous (chunks of materialised candidates are
    views), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
