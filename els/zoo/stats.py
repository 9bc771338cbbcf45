"""Per-class statistics of the training-free denoisers (els.zoo): the training images with their
mean, covariance eigenbasis and eigenvalues (float64), saved as safetensors with a content checksum
and the training set's fingerprint.

An image is the vector of its n = C*H*W entries: one covariance spans every channel-pixel.
Sigma = (1/(N-1)) sum_k (phi_k - mu)(phi_k - mu)^T = U diag(lam) U^T (symmetric eigendecomposition,
float64; round-off lam < 0 clamped to 0). A single image has no spread: Sigma = 0.

pca_locality's binary mask B(t) is NOT stored: it depends on t (so on the schedule's length) and
costs one n x n x n product per t (about 0.1 s at n = 1024); `mask` computes it in float64 once per
(t, threshold) and keeps it in memory for the object's lifetime (one sampling job), so the file stays
valid for every schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..index import images_fingerprint, to_float
from ..io import content_sha256

FORMAT = "els.ZooStats"
FORMAT_VERSION = 1
# |G_ii| below this: the entry has no variance at this t (a constant pixel); see ZOO_SPEC.md
DIAGONAL_FLOOR = 1e-6


class ZooStatsError(ValueError):
    """Statistics that do not fit the request, or a file that is not valid statistics."""


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ZooStatsError(f"training images must be [N, C, H, W], got {shape}")
    if images.shape[0] == 0:
        raise ZooStatsError("the training set is empty: a denoiser needs at least one image")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ZooStatsError(f"training images must be uint8 or float, got {images.dtype}")
    return images.detach().cpu().contiguous()


class ZooStats:
    """Training images [N, C, H, W] (uint8 or float in [-1, 1], kept as given) and their Gaussian fit.

    Build with `ZooStats.build(images)`, `save(path)`, `ZooStats.load(path)`. Float copies of the
    images per (dtype, device) and pca_locality masks per (t, threshold) are cached in memory.
    """

    def __init__(
        self,
        images: torch.Tensor,
        mean: torch.Tensor,
        eigvecs: torch.Tensor,
        eigvals: torch.Tensor,
        fingerprint: str | None = None,
    ):
        self.images = images
        self.mean = mean
        self.eigvecs = eigvecs
        self.eigvals = eigvals
        self.fingerprint = fingerprint or images_fingerprint(images)
        self._masks: dict = {}
        self.cache: dict = {}  # derived tensors per (name, dtype, device), see `derived`

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.images.shape)

    @property
    def dim(self) -> int:
        return self.images[0].numel()

    @property
    def has_gaussian(self) -> bool:
        return self.eigvecs is not None

    def _need_gaussian(self) -> None:
        if not self.has_gaussian:
            raise ZooStatsError(
                "these statistics hold no Gaussian fit (built with gaussian=False): wiener and "
                "pca_locality need ZooStats.build(images)"
            )

    @classmethod
    def build(cls, images: torch.Tensor, *, gaussian: bool = True) -> ZooStats:
        """Mean, covariance and its eigendecomposition, all float64, on the CPU. gaussian=False
        keeps only the images (enough for optimal, scfdm and nearest_dataset)."""
        images = _check_images(images)
        if not gaussian:
            return cls(images, None, None, None)
        N = images.shape[0]
        flat = to_float(images, torch.float64).reshape(N, -1)
        mean = flat.mean(dim=0)
        centred = flat - mean
        cov = centred.T @ centred / (N - 1) if N > 1 else centred.T @ centred
        cov = (cov + cov.T) / 2  # exactly symmetric before eigh
        eigvals, eigvecs = torch.linalg.eigh(cov)
        return cls(images, mean, eigvecs.contiguous(), eigvals.clamp(min=0.0))

    # ----------------------------------------------------------------------------- derived data
    def derived(self, name, dtype: torch.dtype, device, make) -> torch.Tensor:
        """make() (a CPU tensor) cast to dtype on device, computed once per (name, dtype, device)."""
        key = (name, dtype, torch.device(device))
        if key not in self.cache:
            self.cache[key] = make().to(device=device, dtype=dtype).contiguous()
        return self.cache[key]

    def float_images(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The images as [N, n] floats in [-1, 1] on device (cached)."""
        N = self.images.shape[0]
        return self.derived(
            "images", dtype, device, lambda: to_float(self.images, torch.float64).reshape(N, -1)
        )

    def gain_diagonal(self, a: float, b2: float) -> torch.Tensor:
        """a lam / (a^2 lam + b^2) per eigenvalue (float64): wiener's shrinkage."""
        self._need_gaussian()
        return a * self.eigvals / (a * a * self.eigvals + b2)

    def mask(self, a: float, b2: float, threshold: float) -> torch.Tensor:
        """pca_locality's B [n, n] (float64, CPU) at signal scale a and noise variance b2; column j
        weighs the residuals of output entry j (see ZOO_SPEC.md). Cached per (a, b2, threshold)."""
        self._need_gaussian()
        key = (float(a), float(b2), float(threshold))
        if key not in self._masks:
            U = self.eigvecs
            g = a * a * self.eigvals / (a * a * self.eigvals + b2)
            G = (U * g) @ U.T
            diag = G.diagonal().clone()
            flat = diag.abs() < DIAGONAL_FLOOR
            G.diagonal()[flat] = 1.0
            D = torch.where(flat, torch.ones_like(diag), diag)
            M = G / D.unsqueeze(1)
            if threshold <= 0:
                B = M
            else:
                B = (M.abs() >= threshold * M.abs().max()).to(torch.float64)
            self._masks[key] = B.contiguous()
        return self._masks[key]

    # ----------------------------------------------------------------------------- checks
    def check(self, images: torch.Tensor | None = None, shape=None) -> None:
        """Refuse statistics of another training set (fingerprint) or image shape."""
        if images is not None and images_fingerprint(images) != self.fingerprint:
            raise ZooStatsError(
                "statistics were built from another training set "
                f"(fingerprint {self.fingerprint[:12]}... differs): rebuild them"
            )
        if shape is not None and tuple(shape) != tuple(self.images.shape[1:]):
            raise ZooStatsError(
                f"x has image shape {tuple(shape)}, the statistics' training set "
                f"{tuple(self.images.shape[1:])}"
            )

    # ----------------------------------------------------------------------------- files
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "images": self.images.cpu().contiguous(),
            "mean": self.mean.cpu().contiguous(),
            "eigvecs": self.eigvecs.cpu().contiguous(),
            "eigvals": self.eigvals.cpu().contiguous(),
        }

    @staticmethod
    def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
        return content_sha256(tensors)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write as safetensors (no pickle), atomically, with a content checksum; metadata: extra
        strings (e.g. dataset and class) kept in the header."""
        from ..io import write_safetensors

        self._need_gaussian()
        tensors = self._tensors()
        meta = {
            **{str(k): str(v) for k, v in (metadata or {}).items()},
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "shape": json.dumps(list(self.images.shape)),
            "content_sha256": self._content_hash(tensors),
        }
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(
        cls, path: str | Path, *, images: torch.Tensor | None = None, verify: bool = True
    ) -> ZooStats:
        """Read statistics written by save(); refuse a corrupt file, another format version, or
        (with images) statistics of another training set."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ZooStatsError(f"statistics file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises several types for broken headers/data
            raise ZooStatsError(
                f"statistics file {path} is not readable safetensors: {err}"
            ) from err
        if meta.get("format") != FORMAT:
            raise ZooStatsError(f"{path} is not an els.zoo statistics file (format missing)")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ZooStatsError(
                f"{path} has statistics format {meta.get('format_version')}, this els reads "
                f"{FORMAT_VERSION}: rebuild it"
            )
        missing = {"images", "mean", "eigvecs", "eigvals"} - set(tensors)
        if missing:
            raise ZooStatsError(f"statistics file {path} lacks {sorted(missing)}")
        if verify and cls._content_hash(tensors) != meta.get("content_sha256"):
            raise ZooStatsError(f"statistics file {path} is corrupt: its checksum does not match")
        stats = cls(tensors["images"], tensors["mean"], tensors["eigvecs"], tensors["eigvals"])
        if stats.fingerprint != meta.get("fingerprint"):
            raise ZooStatsError(
                f"statistics file {path} is corrupt: its images do not match their fingerprint"
            )
        if images is not None:
            try:
                stats.check(images)
            except ZooStatsError as err:
                raise ZooStatsError(f"statistics file {path} is stale: {err}") from None
        return stats
