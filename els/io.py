"""Files of the pipeline: atomic writers (temporary file in the same folder, then os.replace, so a
reader never sees a partial file) and readers of the sample files.

Sample file (results/samples/{dataset}/{machine}/{class}/seed{seed}.safetensors), safetensors only:
  tensors  noise [C, H, W] float32 (x at t = (n-1)/n), image [C, H, W] float32 in about [-1, 1];
           with trajectories also trajectory_x and trajectory_denoised [S, C, H, W] float32 (one entry
           per reverse step, t decreasing: x after the step and the predicted clean image);
  metadata (strings) format, dataset, machine, class, seed, noise_key, t and k (JSON lists, one entry
           per step), batch_seeds (JSON), batch_file, device, dtype, threads, els_version,
           torch_version, schedule (file), schedule_scales (JSON), max_train_per_class, n_train,
           index_fingerprint. No timings: the same config writes the same bytes on every run and
           executor (the sampling time is in the sample_batch log and the rule benchmarks).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SAMPLE_FORMAT = "els.sample"


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.{name}.*.tmp` files next to `path`: what a writer killed before its rename (SIGKILL,
    node failure) left behind. Only one job writes a given output at a time (Snakemake's plan and
    its directory lock), so a temporary of `path` that exists now is stale."""
    prefix = f".{path.name}."
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, else removed.

    A crash at any point leaves `path` as it was (absent, or the previous complete file): never a
    truncated file under the final name. Stale temporaries of `path` from killed writers are
    removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call writer(temporary_path) and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Save tensors (copied to the CPU, contiguous, so views of one storage are fine) with string
    metadata (non-strings are JSON-encoded), atomically; the header's metadata is sorted, so the
    same tensors and metadata always give the same bytes (els.safetensors_file)."""
    from .safetensors_file import save_file

    tensors = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write JSON (indented, keys sorted), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return write_with(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [-1, 1] (or uint8) -> uint8 [H, W] (C = 1) or [H, W, 3] for a PNG.

    Floats are mapped back with u = round((x + 1) * 127.5), clipped to [0, 255]: the inverse of the
    data's u / 127.5 - 1, so an 8-bit training image round-trips exactly.
    """
    if image.dim() != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        u = image.cpu().numpy()
    else:
        x = image.detach().to(torch.float64).cpu()
        u = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return u[0] if u.shape[0] == 1 else u.transpose(1, 2, 0)


def write_png(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write an image [C, H, W] (float in [-1, 1] or uint8) as an 8-bit PNG, pixel for pixel."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image))
    return write_with(path, lambda tmp: pil.save(tmp, format="PNG"))


@dataclass
class Sample:
    """A sample file, read back (see the module docstring)."""

    noise: torch.Tensor
    image: torch.Tensor
    metadata: dict[str, str]
    t: list[float] = field(default_factory=list)
    k: list[int] = field(default_factory=list)
    trajectory_x: torch.Tensor | None = None
    trajectory_denoised: torch.Tensor | None = None

    def meta_json(self, key: str):
        return json.loads(self.metadata[key])


def write_sample(
    path: str | os.PathLike,
    *,
    noise: torch.Tensor,
    image: torch.Tensor,
    metadata: Mapping[str, object],
    trajectory_x: torch.Tensor | None = None,
    trajectory_denoised: torch.Tensor | None = None,
) -> Path:
    """Write one sample file (float32 tensors, string metadata), atomically."""
    tensors = {"noise": noise.float(), "image": image.float()}
    if trajectory_x is not None:
        tensors["trajectory_x"] = trajectory_x.float()
        tensors["trajectory_denoised"] = trajectory_denoised.float()
    return write_safetensors(path, tensors, {"format": SAMPLE_FORMAT, **metadata})


def read_sample(path: str | os.PathLike) -> Sample:
    """Read a sample file written by write_sample."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != SAMPLE_FORMAT or "image" not in tensors:
        raise ValueError(f"{path} is not an els sample file (format {meta.get('format')!r})")
    return Sample(
        noise=tensors["noise"],
        image=tensors["image"],
        metadata=meta,
        t=json.loads(meta.get("t", "[]")),
        k=json.loads(meta.get("k", "[]")),
        trajectory_x=tensors.get("trajectory_x"),
        trajectory_denoised=tensors.get("trajectory_denoised"),
    )
