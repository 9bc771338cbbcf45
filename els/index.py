"""PatchIndex: what the kernel reuses for one machine, one training set and every patch size of a
schedule; built once, saved, loaded, refused when stale.

The kernel (els.kernel) needs only the training images: candidate patches are read in place from
the zero-padded images and their squared norms are window sums of the squared images, O(H W) per
image and patch size (a prefix sum), against O(H W |D|) for the dot products. So the index holds
the images (uint8 when they are 8-bit: 1 byte a pixel, the file is the size of the class) and the
patch sizes it serves, and prepares per device and dtype the padded float images and, per k, the
candidate norms when a sample needs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .io import content_sha256, write_safetensors
from .kernel import LANE_PAD

NORM_CHUNK = 512  # images per chunk of the candidate norms' prefix sums
MACHINES = ("ideal", "ls", "els", "bbels")
FORMAT_VERSION = 3
# code value of an 8-bit pixel u is 2u - 255, so that the zero padding (0.0 in [-1, 1]) is the code 0
# and the float value is code / 255 exactly as ToTensor + Normalize(0.5, 0.5) gives u / 127.5 - 1.
_CODE_SCALE = 255.0


class PatchIndexError(ValueError):
    """A patch index that does not fit the request, or a file that is not a valid index."""


def images_fingerprint(images: torch.Tensor) -> str:
    """sha256 of a training set's dtype, shape and bytes: ties an index to the images it was built from."""
    return content_sha256(images.detach())


def to_float(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images -> [-1, 1] (u / 127.5 - 1, computed as (2u - 255) / 255); float images unchanged."""
    if images.dtype == torch.uint8:
        return (images.to(torch.int16) * 2 - 255).to(dtype) / _CODE_SCALE
    return images.to(dtype)


def check_patch_size(machine: str, k, height: int, width: int) -> None:
    """A patch size must be a positive odd int; ELS also needs k <= H and k <= W."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k % 2 == 0:
        raise PatchIndexError(
            f"patch size k={k!r} for machine {machine!r}: must be a positive odd int"
        )
    if machine == "els" and (k > height or k > width):
        raise PatchIndexError(
            f"patch size k={k} is larger than the {height}x{width} image: the ELS machine needs "
            f"candidate patches that fit inside the image (k <= {min(height, width)})"
        )


def check_train_images(images: torch.Tensor) -> None:
    """Training images: [N, C, H, W], N >= 1, uint8 (8-bit pixels) or finite float in [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise PatchIndexError(f"training images must be a tensor [N, C, H, W], got {shape}")
    if images.shape[0] == 0:
        raise PatchIndexError("the training set is empty: a machine needs at least one image")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise PatchIndexError(f"training images must be uint8 or float, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise PatchIndexError("training images contain NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise PatchIndexError(
            f"float training images must lie in [-1, 1], these span [{lo:g}, {hi:g}]: pass the "
            "8-bit images as uint8, or convert them as u / 127.5 - 1"
        )


class PatchIndex:
    """The training images of one machine and the patch sizes `ks` it serves.

    Build once with `PatchIndex.build(images, machine, ks)`, `save(path)`, `PatchIndex.load(path)`;
    the score functions and the sampler only read it. images: uint8 [N, C, H, W] (8-bit pixels, the
    pipeline's prepared data) or float [N, C, H, W] in [-1, 1].
    """

    def __init__(self, machine: str, ks: Iterable[int], images: torch.Tensor, fingerprint=None):
        self.machine = machine
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        self.images = images
        self.fingerprint = fingerprint or images_fingerprint(images)
        self._prepared: dict = {}  # (dtype, device) -> padded float images; + the current k's norms

    @classmethod
    def build(
        cls, images: torch.Tensor, machine: str, ks: int | Iterable[int] | None = None
    ) -> PatchIndex:
        """The index of `machine` for patch size(s) ks (an int or several; ignored for 'ideal')."""
        if machine not in MACHINES:
            raise PatchIndexError(
                f"unknown machine {machine!r}; expected one of {', '.join(MACHINES)}"
            )
        check_train_images(images)
        H, W = images.shape[-2:]
        if machine == "ideal":
            ks = (0,)
        else:
            if ks is None:
                raise PatchIndexError(f"machine {machine!r} needs a patch size k")
            ks = (ks,) if isinstance(ks, int) else tuple(ks)
            for k in ks:
                check_patch_size(machine, k, H, W)
        return cls(machine, ks, images.detach().cpu().contiguous())

    @property
    def k(self) -> int:
        """The patch size of an index that serves one."""
        if len(self.ks) != 1:
            raise PatchIndexError(f"this index serves several patch sizes {self.ks}: name k")
        return self.ks[0]

    def check(self, machine: str, k: int | None = None, images: torch.Tensor | None = None) -> None:
        """Refuse to use this index for another machine, patch size or training set."""
        k = 0 if machine == "ideal" else k
        if machine != self.machine or (k is not None and k not in self.ks):
            raise PatchIndexError(
                f"index is for machine {self.machine!r} at k={list(self.ks)}, not {machine!r} "
                f"at k={k}"
            )
        if images is not None and images_fingerprint(images) != self.fingerprint:
            raise PatchIndexError(
                f"index ({self.machine}, k={list(self.ks)}) was built from another training set "
                f"(fingerprint {self.fingerprint[:12]}... differs)"
            )

    def to(self, device: torch.device | str) -> PatchIndex:
        """The same index with its images on `device` (itself if they are there already)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return PatchIndex(self.machine, self.ks, self.images.to(device), self.fingerprint)

    # ----------------------------------------------------------------------------- kernel inputs
    def padded_images(self, dtype: torch.dtype, device) -> tuple[torch.Tensor, tuple[int, int]]:
        """Float images zero-padded for the kernel, and where pixel (0, 0) sits: rows by the
        largest k // 2, columns by the width more on each side (the kernel's lanes run over every
        displacement of a row, in whole vectors), [N, C, H + 2p, W + 2q + 2 LANE_PAD]."""
        key = (dtype, str(device))
        if key not in self._prepared:
            p = max(self.ks) // 2
            q = self.images.shape[-1] + p
            images = to_float(self.images.to(device), dtype)
            padded = F.pad(images, (q, q + 2 * LANE_PAD, p, p)).contiguous()
            self._prepared = {key: (padded, (p, q))}
        return self._prepared[key]

    def candidate_norms(self, k: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Squared norms of the zero-padded k x k patches at every centre [N, H, W + LANE_PAD]
        (window sums of the squared images by a float64 prefix sum; the current k is kept)."""
        key = ("norms", k, dtype, str(device))
        cached = self._prepared.get("norms")
        if cached is not None and cached[0] == key:
            return cached[1]
        h = k // 2
        N, C, H, W = self.images.shape
        norms = torch.zeros(N, H, W + LANE_PAD, dtype=dtype, device=device)
        # in chunks of images: float64 prefix sums of a whole class at once take ~0.3 GB (6000 x 32 x 32)
        for j in range(0, N, NORM_CHUNK):
            images = self.images[j : j + NORM_CHUNK].to(device)
            sq = to_float(images, torch.float64).square().sum(1)  # [n, H, W]
            sq = F.pad(sq, (h + 1, h, h + 1, h))  # a zero row/col first: the prefix sum's origin
            cum = sq.cumsum(1).cumsum(2)
            box = cum[:, k:, k:] - cum[:, :-k, k:] - cum[:, k:, :-k] + cum[:, :-k, :-k]
            norms[j : j + NORM_CHUNK, :, :W] = box.to(dtype)
        self._prepared["norms"] = (key, norms)
        return norms

    def release(self) -> None:
        """Drop the prepared float images and norms (they are rebuilt when needed)."""
        self._prepared = {}

    # ----------------------------------------------------------------------------- files
    @staticmethod
    def _content_hash(images: torch.Tensor) -> str:
        return content_sha256({"images": images})

    def save(self, path: str | Path) -> None:
        """Write the index as safetensors (no pickle), atomically, with a content checksum."""
        images = self.images.cpu().contiguous()
        meta = {
            "format": "els.PatchIndex",
            "format_version": str(FORMAT_VERSION),
            "machine": self.machine,
            "ks": json.dumps(list(self.ks)),
            "fingerprint": self.fingerprint,
            "content_sha256": self._content_hash(images),
        }
        write_safetensors(path, {"images": images}, meta)  # sorted metadata: same bytes every run

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        machine: str | None = None,
        k: int | None = None,
        images: torch.Tensor | None = None,
        verify: bool = True,
    ) -> PatchIndex:
        """Read an index written by save(); refuse a corrupt file or one for another machine/k/images."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PatchIndexError(f"patch index {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises several types for broken headers/data
            raise PatchIndexError(
                f"patch index {path} is not a readable safetensors file: {err}"
            ) from err
        if meta.get("format") != "els.PatchIndex":
            raise PatchIndexError(f"{path} is not an els patch index (metadata format missing)")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise PatchIndexError(
                f"{path} has index format {meta.get('format_version')}, this els reads "
                f"{FORMAT_VERSION}: rebuild it"
            )
        if "images" not in tensors:
            raise PatchIndexError(f"patch index {path} is corrupt: it holds no images")
        if verify and cls._content_hash(tensors["images"]) != meta.get("content_sha256"):
            raise PatchIndexError(
                f"patch index {path} is corrupt: its content checksum does not match"
            )
        index = cls(meta["machine"], json.loads(meta["ks"]), tensors["images"])
        if index.fingerprint != meta["fingerprint"]:
            raise PatchIndexError(
                f"patch index {path} is corrupt: its images do not match their fingerprint"
            )
        index.check(machine or index.machine, k, images)
        return index
