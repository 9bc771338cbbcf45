"""The compiled softmax fold (els/csrc/softmax_fold.cpp): built on first use, CPU only, optional.

On a CPU the streaming softmax is bound by the matrix products at high noise; what is left is the
fold of each chunk's logits into the running state (max, exp, weighted sums), which in torch takes
seven passes over the chunk. The compiled fold finishes each query's row of logits while it sits
in cache: 2-4x faster than the torch passes on 2M logits; a FashionMNIST sample took 26% less time.

It is compiled once per machine type with torch's extension builder (needs a C++ compiler and
ninja; about 25 s) into ~/.cache/els (ELS_NATIVE_DIR overrides). The build is keyed by the source,
the torch version and the CPU's instruction sets, so nodes of a cluster sharing a home directory
never load a build made for another CPU. Without a compiler, or with ELS_NATIVE=0, the torch fold
runs instead (same results up to float rounding) and a warning says why once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "softmax_fold.cpp"
# -fno-trapping-math lets GCC vectorise the rounding in the exp (7x faster); -march=native is safe
# because the build directory is keyed by this CPU's instruction sets (see _build_dir)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    """Whether the compiled fold may be used (ELS_NATIVE=0 turns it off)."""
    return os.environ.get("ELS_NATIVE", "1") != "0"


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
                torch.__version__.encode(),
                _cpu_flags().encode(),
                " ".join(CFLAGS).encode(),
            ]
        )
    ).hexdigest()[:16]
    root = Path(os.environ.get("ELS_NATIVE_DIR", Path.home() / ".cache" / "els"))
    return root / f"softmax_fold_{key}"


def _load():
    build = _build_dir()
    build.mkdir(parents=True, exist_ok=True)
    # torch logs "No CUDA runtime is found" (on import) on a CPU machine: this is a CPU extension
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"els_{build.name}",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    finally:
        log.setLevel(level)


def fold_module():
    """The compiled module (fold_chunk), or None where it is turned off or cannot be built."""
    if not enabled():
        return None
    if "module" in _state:  # the per-chunk path: no lock once loaded (or once failed)
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _load()
            except Exception as err:  # no compiler, no ninja, a read-only cache: torch fold
                _state["module"] = None
                warnings.warn(
                    f"els: the compiled softmax fold could not be built ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}); "
                    "using the torch fold (same results up to float rounding, slower on a CPU). "
                    "Install a C++ compiler and `pip install ninja` to build it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["module"]


MAX_CHANNELS = 8  # centre channels the compiled fold handles (the ideal score's are whole images)


def usable(t: torch.Tensor, channels: int) -> bool:
    """Whether the compiled fold can fold logits like t (CPU, float32/float64) with this many centre
    channels."""
    return (
        t.device.type == "cpu"
        and t.dtype in (torch.float32, torch.float64)
        and channels <= MAX_CHANNELS
        and fold_module() is not None
    )
