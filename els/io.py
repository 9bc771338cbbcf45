"""Files of the pipeline: the one atomic writer, the one content hasher, and the sample files.

Atomic writing (every file the package or a workflow script writes goes through it):
  atomic_path(path)          context manager: yields a temporary path next to `path`; the caller writes
                             it; on success it is renamed over `path` (os.replace), on any exception it
                             is removed, so a reader never sees a partial file under the final name.
  write_with(path, writer)   the same as a call: writer(temporary_path), then rename.
  write_text / write_json / write_bytes / copy_file / write_safetensors / write_png / write_sample
                             the usual formats on top of write_with. `fsync=True` (atomic_path,
                             write_with, write_safetensors) flushes the data to disk before the
                             rename, for files that are expensive to rebuild (the prepared data set).

Content hashing (sha256, hex): one scheme for tensors, so fingerprints agree across modules.
  content_sha256(tensor)                 sha256 of f"{dtype}|{shape}|" + the tensor's bytes
  content_sha256({name: tensor, ...})    names sorted; per tensor f"{name}|{dtype}|{shape}|" + bytes
  content_sha256(tensor, describe=False) sha256 of the bytes alone (numpy arrays accepted)
  ContentHasher                          the same steps one at a time (text, tensors) for hashes
                                         that combine several parts.
  dtype is torch's name (torch.uint8), shape a Python tuple, bytes the C-contiguous CPU buffer.

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
import hashlib
import json
import os
import shutil
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
def atomic_path(
    path: str | os.PathLike, mode: int = 0o644, *, fsync: bool = False
) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`, else removed.

    A crash at any point leaves `path` as it was (absent, or the previous complete file): never a
    truncated file under the final name. Stale temporaries of `path` from killed writers are
    removed first. The temporary exists (empty) when yielded; the file gets `mode` (mkstemp's is
    0600). With fsync the data is flushed to disk before the rename, so a power cut cannot leave
    an empty file under the final name either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as stream:
                os.fsync(stream.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_with(
    path: str | os.PathLike, writer: Callable[[Path], object], *, fsync: bool = False
) -> Path:
    """Call writer(temporary_path) and move the result into place atomically (see atomic_path).

    The writer must write to the path it is given, whatever its name: a temporary ending in
    .tmp, so a writer that picks the format from the suffix needs it named (savefig(..,
    format="png"), to_csv writes text anyway)."""
    with atomic_path(path, fsync=fsync) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def copy_file(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy the file `source` to `path` (contents only), atomically."""
    return write_with(path, lambda tmp: shutil.copyfile(source, tmp))


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, object] | None = None,
    *,
    fsync: bool = False,
) -> Path:
    """Save tensors (copied to the CPU, contiguous, so views of one storage are fine) with string
    metadata (non-strings are JSON-encoded), atomically; the header's metadata is sorted, so the
    same tensors and metadata always give the same bytes (els.safetensors_file)."""
    from .safetensors_file import save_file

    tensors = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), fsync=fsync)


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


# ----------------------------------------------------------------------------- content hashing


def _contiguous_cpu(tensor: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(tensor, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(tensor))
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"content hashing takes tensors or numpy arrays, got {type(tensor).__name__}"
        )
    return tensor.detach().cpu().contiguous()


class ContentHasher:
    """sha256 built from text and tensors, in the order given (see the module docstring)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def text(self, text: str) -> ContentHasher:
        self._sha.update(text.encode())
        return self

    def tensor(
        self, tensor: torch.Tensor | np.ndarray, *, name: str | None = None, describe: bool = True
    ) -> ContentHasher:
        """Add a tensor's bytes, preceded (describe=True) by f"{name}|{dtype}|{shape}|" (the name
        part only when given), so equal bytes of another dtype or shape hash differently."""
        t = _contiguous_cpu(tensor)
        if describe:
            self.text((f"{name}|" if name is not None else "") + f"{t.dtype}|{tuple(t.shape)}|")
        if t.numel():  # through uint8: also dtypes numpy lacks (bfloat16)
            self._sha.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return self

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(
    tensors: torch.Tensor | np.ndarray | Mapping[str, torch.Tensor | np.ndarray],
    *,
    describe: bool = True,
) -> str:
    """sha256 (hex) of one tensor or of named tensors (names sorted); see the module docstring."""
    hasher = ContentHasher()
    if isinstance(tensors, Mapping):
        for name in sorted(tensors):
            hasher.tensor(tensors[name], name=name, describe=describe)
    else:
        hasher.tensor(tensors, describe=describe)
    return hasher.hexdigest()


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
