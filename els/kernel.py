"""The one kernel behind every patch machine: per query pixel, a streaming softmax over the candidate
patches at p + d of every training image, d from the machine's displacement blocks (els.machines).

On a CPU it is the compiled C++ kernel els/csrc/patch_softmax.cpp (window sums of products: O(1)
work per (query, candidate) pair whatever k is; all cores; float32 and float64). It is compiled
once per machine type with torch's extension builder (a C++ compiler and ninja; about 30 s, said
on stderr when it happens) into ~/.cache/els (ELS_KERNEL_DIR overrides), keyed by the source, the
torch version and the CPU's instruction sets, so cluster nodes sharing a home directory never load
a build made for another CPU. On other devices the same blocks run as dense masked products in torch
(`dense_patch_softmax`, also the CPU's fallback where no compiler exists).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("csrc") / "patch_softmax.cpp"
HEADER = SOURCE.with_suffix(".h")  # the kernel itself; the .cpp binds it
# -fno-trapping-math lets GCC vectorise the rounding in the exp; -march=native is safe because the
# build directory is keyed by this CPU's instruction sets (see _build_dir)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LANE_PAD = 16  # columns of padding the C++ kernel's vector lanes may read past a row
DENSE_BUDGET = 2 * 2**30  # bytes of logits (and their temporaries) per chunk of the dense products

_lock = threading.Lock()
_state: dict = {}


@dataclass
class KernelResult:
    """Per query pixel: the softmax-weighted mean of candidate centres [B, C, H, W]; with stats, the
    dominant candidate's training image, centre row and column, its weight, and 1 / sum w^2 [B, H, W]."""

    mean: torch.Tensor
    best_image: torch.Tensor | None = None
    best_row: torch.Tensor | None = None
    best_col: torch.Tensor | None = None
    best_weight: torch.Tensor | None = None
    n_eff: torch.Tensor | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir() -> Path:
    key = hashlib.sha256(
        b"\0".join(
            [
                SOURCE.read_bytes(),
                HEADER.read_bytes(),
                torch.__version__.encode(),
                _cpu_flags().encode(),
                " ".join(CFLAGS).encode(),
            ]
        )
    ).hexdigest()[:16]
    root = Path(os.environ.get("ELS_KERNEL_DIR", Path.home() / ".cache" / "els"))
    return root / f"patch_softmax_{key}"


def _sources_in(build: Path) -> Path:
    """The kernel's sources copied into its build directory (the copy's path is what torch's
    builder records, so checkouts in different places share one build instead of rebuilding
    it whenever another one loads it). Returns the .cpp's copy."""
    from .io import copy_file

    for source in (SOURCE, HEADER):
        copy = build / source.name
        if not copy.is_file() or copy.read_bytes() != source.read_bytes():
            copy_file(source, copy)
    return build / SOURCE.name


def _load():
    build = _build_dir()
    fresh = not any(build.glob("*.so"))
    build.mkdir(parents=True, exist_ok=True)
    if fresh:
        print(
            f"els: compiling the CPU kernel once for this machine (about 30 s) into {build}",
            file=sys.stderr,
            flush=True,
        )
    # torch logs "No CUDA runtime is found" (on import) on a CPU machine: this is a CPU extension
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"els_{build.name}",
            sources=[str(_sources_in(build))],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    finally:
        log.setLevel(level)


def compiled_kernel():
    """The compiled CPU module, or None where it cannot be built (then a warning says why, once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _load()
            except Exception as err:  # no compiler, no ninja, a read-only cache
                _state["module"] = None
                last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                warnings.warn(
                    f"els: the CPU kernel could not be compiled ({type(err).__name__}: {last}); "
                    "using dense torch products instead (same results up to float rounding, "
                    "much slower). Install a C++ compiler and `pip install ninja`.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["module"]


def patch_softmax(
    queries: torch.Tensor,
    padded_train: torch.Tensor,
    pad: tuple[int, int],
    norms: torch.Tensor,
    blocks: torch.Tensor,
    k: int,
    alpha: float,
    beta: float,
    stats: bool,
    memory_budget: int = DENSE_BUDGET,
) -> KernelResult:
    """The softmax over displaced candidates for queries padded by k // 2 [B, C, H+2h, W+2h].

    padded_train [N, C, H + 2 p, W + 2 q + 2 LANE_PAD]: the training images zero-padded, pixel
    (r, c) at (r + p, c + q), pad = (p, q) (els.PatchIndex.padded_images: p >= k // 2 and
    q >= W + k // 2 cover every displacement the kernel's lanes read); norms [N, H, W + LANE_PAD]: squared norms of the k x k candidate patches at every
    centre; blocks [nb, 12]: (Q, R, D) rectangles (els.machines.machine_blocks); the logit of
    candidate c against query q is alpha <q, c> - beta |c|^2."""
    module = compiled_kernel() if queries.device.type == "cpu" else None
    if module is None:
        return dense_patch_softmax(
            queries, padded_train, pad, norms, blocks, k, alpha, beta, stats, memory_budget
        )
    mean, best_w, n_eff, bj, br, bc = module.patch_softmax(
        queries.contiguous(),
        padded_train,
        norms,
        blocks,
        k,
        pad[0],
        pad[1],
        alpha,
        beta,
        stats,
        torch.get_num_threads(),
    )
    if not stats:
        return KernelResult(mean)
    return KernelResult(mean, bj, br, bc, best_w, n_eff)


def dense_patch_softmax(
    queries, padded_train, pad, norms, blocks, k, alpha, beta, stats, memory_budget=DENSE_BUDGET
):
    """The same softmax as dense masked products in torch, chunked over training images so that a
    chunk's logits and temporaries fit memory_budget (any device): per block, the logits of its
    queries against all candidate centres of R, the pairs whose displacement lies outside D
    masked out. Candidate order (image, row, col) as the C++ kernel's, so ties break alike. Each
    query image runs alone, so a batch equals its images alone bit for bit."""
    if queries.shape[0] > 1:
        parts = [
            dense_patch_softmax(
                queries[i : i + 1],
                padded_train,
                pad,
                norms,
                blocks,
                k,
                alpha,
                beta,
                stats,
                memory_budget,
            )
            for i in range(queries.shape[0])
        ]
        fields = ("mean",) + (
            ("best_image", "best_row", "best_col", "best_weight", "n_eff") if stats else ()
        )
        return KernelResult(**{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})
    B, C, Hq, Wq = queries.shape
    h = k // 2
    N, H, W = padded_train.shape[0], Hq - 2 * h, Wq - 2 * h
    row_pad, col_pad = pad
    train = padded_train[:, :, row_pad - h : row_pad + H + h, col_pad - h : col_pad + W + h]
    q_cols = F.unfold(queries, k)  # [B, C k^2, H W]
    mean = queries.new_zeros(B, C, H * W)
    out = {n: torch.zeros(B, H * W, dtype=torch.long, device=queries.device) for n in "jrc"}
    best_w = queries.new_zeros(B, H * W)
    n_eff = queries.new_zeros(B, H * W)
    rows = torch.arange(H, device=queries.device)
    cols = torch.arange(W, device=queries.device)
    for q_r0, q_r1, q_c0, q_c1, r_r0, r_r1, r_c0, r_c1, d_r0, d_r1, d_c0, d_c1 in blocks.tolist():
        qr, qc = rows[q_r0 : q_r1 + 1], cols[q_c0 : q_c1 + 1]
        rr, rc = rows[r_r0 : r_r1 + 1], cols[r_c0 : r_c1 + 1]
        q_pos = (qr[:, None] * W + qc[None, :]).reshape(-1)
        r_pos = (rr[:, None] * W + rc[None, :]).reshape(-1)
        r_row, r_col = r_pos // W, r_pos % W
        dy = r_row[None, :] - (q_pos // W)[:, None]
        dx = r_col[None, :] - (q_pos % W)[:, None]
        valid = (dy >= d_r0) & (dy <= d_r1) & (dx >= d_c0) & (dx <= d_c1)  # [P, S]
        q = q_cols[:, :, q_pos].transpose(1, 2)  # [B, P, D]
        P, S = q_pos.numel(), r_pos.numel()
        per_image = 4 * q.element_size() * P * S  # logits, weights and two temporaries
        if per_image > memory_budget:
            raise ValueError(
                f"memory_budget={memory_budget} bytes is below what one training image's logits "
                f"need here ({per_image} bytes): raise it"
            )
        step = memory_budget // per_image
        m = q.new_full((B, P), float("-inf"))
        s = q.new_zeros(B, P)
        acc = q.new_zeros(B, P, C)
        sq = q.new_zeros(B, P)
        best = q.new_full((B, P), float("-inf"))
        best_id = torch.zeros(B, P, dtype=torch.long, device=q.device)
        for j0 in range(0, N, step):
            y = train[j0 : j0 + step]
            n = y.shape[0]
            cand = F.unfold(y, k)[:, :, r_pos]  # [n, D, S]
            centre = padded_train[j0 : j0 + n, :, row_pad : row_pad + H, col_pad : col_pad + W]
            centre = centre.reshape(n, C, H * W)[:, :, r_pos]  # [n, C, S]
            logits = alpha * torch.einsum("bpd,nds->bpns", q, cand)
            logits = (
                logits - beta * norms[j0 : j0 + n, :, :W].reshape(n, H * W)[:, r_pos][None, None]
            )
            logits = logits.masked_fill(~valid[None, :, None, :], float("-inf"))
            logits = logits.reshape(B, P, n * S)
            block_max, arg = logits.max(-1)
            new_m = torch.maximum(m, block_max)
            f = torch.exp(m - new_m).nan_to_num(0.0)
            w = torch.exp(logits - new_m[..., None])
            s = s * f + w.sum(-1)
            acc = acc * f[..., None] + torch.einsum("bpns,ncs->bpc", w.view(B, P, n, S), centre)
            sq = sq * f * f + (w * w).sum(-1)
            better = block_max > best
            best_id = torch.where(better, arg + j0 * S, best_id)
            best = torch.where(better, block_max, best)
            m = new_m
        mean[:, :, q_pos] = (acc / s[..., None]).transpose(1, 2)
        if stats:
            out["j"][:, q_pos] = best_id // S
            out["r"][:, q_pos] = r_row[best_id % S]
            out["c"][:, q_pos] = r_col[best_id % S]
            best_w[:, q_pos] = torch.exp(best - m) / s
            n_eff[:, q_pos] = s * s / sq
    mean = mean.view(B, C, H, W)
    if not stats:
        return KernelResult(mean)
    shape = (B, H, W)
    return KernelResult(
        mean,
        out["j"].view(shape),
        out["r"].view(shape),
        out["c"].view(shape),
        best_w.view(shape),
        n_eff.view(shape),
    )
