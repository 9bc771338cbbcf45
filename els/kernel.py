"""The one kernel behind every patch machine: per query pixel, a streaming softmax over the candidate
patches at p + d of every training image, d from the machine's displacement blocks (els.machines).

On a CPU it is the compiled C++ kernel els/csrc/patch_softmax.cpp (window sums of products: O(1)
work per (query, candidate) pair whatever k is; all cores; float32 and float64). It is compiled
once per machine type with torch's extension builder (a C++ compiler and ninja; about 30 s, said
on stderr when it happens) into ~/.cache/els (ELS_KERNEL_DIR overrides), keyed by the source, the
torch version and the CPU's instruction sets, so cluster nodes sharing a home directory never load
a build made for another CPU. On a CUDA GPU the same blocks run in the Triton kernel
(els.triton_kernel), with the same arguments and results.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "patch_softmax.cpp"
HEADER = SOURCE.with_suffix(".h")  # the kernel itself; the .cpp binds it
# -fno-trapping-math lets GCC vectorise the rounding in the exp; -march=native is safe because the
# build directory is keyed by this CPU's instruction sets (see _build_dir)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LANE_PAD = 16  # columns of padding the C++ kernel's vector lanes may read past a row

_lock = threading.Lock()
_state: dict = {}


# what a kernel records beside the mean (its `stats` argument)
NO_STATS = 0
N_EFF = 1  # the effective number of candidates 1 / sum w^2
SOURCES = 2  # and the dominant candidate: its training image, centre row and column, its weight


@dataclass
class KernelResult:
    """Per query pixel: the softmax-weighted mean of candidate centres [B, C, H, W]; with stats
    N_EFF 1 / sum w^2, with SOURCES also the dominant candidate's training image, centre row and
    column and its weight [B, H, W] (None where not recorded)."""

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
    """The compiled CPU module; where it cannot be built, a RuntimeError that says why and what to
    install (the first failure is kept: the build is not tried again in the same process)."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                try:
                    _state["module"] = _load()
                except Exception as err:  # no compiler, no ninja, a read-only cache
                    last = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                    _state["module"] = RuntimeError(
                        f"els: the CPU kernel could not be compiled ({type(err).__name__}: {last}). "
                        "The patch machines need it on a CPU: install a C++ compiler (g++) and "
                        "`pip install ninja`, and make ELS_KERNEL_DIR (or ~/.cache/els) writable."
                    )
    if isinstance(_state["module"], Exception):
        raise _state["module"]
    return _state["module"]


def kernel_for(device: torch.device):
    """patch_softmax of the kernel that runs on `device`: (queries, padded_train, norms, blocks,
    k, row_pad, col_pad, alpha, beta, stats) -> (mean, best weight, n_eff, best image, row, col)."""
    if device.type == "cpu":
        module = compiled_kernel()
        return lambda *args: module.patch_softmax(*args, torch.get_num_threads())
    if device.type == "cuda":
        from . import triton_kernel

        return triton_kernel.patch_softmax
    raise ValueError(f"the patch machines run on a CPU or a CUDA GPU, not on {device.type!r}")


def patch_softmax(
    queries: torch.Tensor,
    padded_train: torch.Tensor,
    pad: tuple[int, int],
    norms: torch.Tensor,
    blocks: torch.Tensor,
    k: int,
    alpha: float,
    beta: float,
    stats: int,
) -> KernelResult:
    """The softmax over displaced candidates for queries padded by k // 2 [B, C, H+2h, W+2h].

    padded_train [N, C, H + 2 p, W + 2 q + 2 LANE_PAD]: the training images zero-padded, pixel
    (r, c) at (r + p, c + q), pad = (p, q) (els.PatchIndex.padded_images: p >= k // 2 and
    q >= W + k // 2 cover every displacement the C++ kernel's lanes read); norms
    [N, H, W + LANE_PAD]: squared norms of the k x k candidate patches at every centre; blocks
    [nb, 12]: (Q, R, D) rectangles (els.machines.machine_blocks); the logit of candidate c against
    query q is alpha <q, c> - beta |c|^2; stats: NO_STATS, N_EFF or SOURCES."""
    kernel = kernel_for(queries.device)
    mean, best_w, n_eff, bj, br, bc = kernel(
        queries.contiguous(), padded_train, norms, blocks, k, pad[0], pad[1], alpha, beta, stats
    )
    if stats == SOURCES:
        return KernelResult(mean, bj, br, bc, best_w, n_eff)
    return KernelResult(mean, n_eff=n_eff if stats == N_EFF else None)
