"""PatchIndex: the candidate sets of one machine at one patch size, built once, saved, loaded, reused.

A machine's score at pixel i is a softmax over a candidate set that depends on i. Pixels that share a
candidate set form a *group*; groups of the same shape form a *family* that is computed in one batched
product. For a training set of N images, patch size k (d = k // 2) and H x W images:

| machine | family   | groups G          | queries per group        | candidates per group                  |
|---------|----------|-------------------|--------------------------|---------------------------------------|
| ideal   | whole    | 1                 | the whole image          | every training image                   |
| ls      | local    | H*W               | pixel i                  | the patch at i of every image (zero pad)|
| els     | interior | 1                 | every pixel (circular)   | every fully-inside patch               |
| bbels   | interior | 1                 | interior pixels          | every fully-inside patch               |
| bbels   | rows     | edge rows         | interior cols of row r   | zero-padded patches on row r, interior cols |
| bbels   | cols     | edge cols         | interior rows of col c   | zero-padded patches on col c, interior rows |
| bbels   | corners  | corner pixels     | that pixel               | the patch at that pixel of every image  |

(bbELS with k >= H and k >= W has only corners: it is LS, as the spec says.)

Candidates are stored implicitly (the training images, uint8 when they are 8-bit, plus per-candidate
squared norms) and unfolded chunk by chunk at sampling time: an explicit copy would repeat every pixel k^2
times (0.4 GB per FashionMNIST class at k=17). Where identical patches are common (small k: the
background), a family also stores its *unique* patches with their multiplicities: a candidate repeated n
times enters the softmax once with log-weight + log n, which is exact.

Candidate ids: in a family with S candidate positions per image, candidate (image j, position s) has id
j * S + s; `source_of` maps ids back to (image, row, col) of the patch centre, for provenance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .blocks import BlockPlan, CandidateBlocks
from .softmax import CandidateChunk, Workspace

MACHINES = ("ideal", "ls", "els", "bbels")
FORMAT_VERSION = 2
# code value of an 8-bit pixel u is 2u - 255, so that the zero padding (0.0 in [-1, 1]) is the code 0
# and the float value is code / 255 exactly as ToTensor + Normalize(0.5, 0.5) gives u / 127.5 - 1.
_CODE_SCALE = 255.0


class PatchIndexError(ValueError):
    """A patch index that does not fit the request, or a file that is not a valid index."""


def images_fingerprint(images: torch.Tensor) -> str:
    """sha256 of a training set's dtype, shape and bytes: ties an index to the images it was built from."""
    images = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{images.dtype}|{tuple(images.shape)}|".encode())
    h.update(images.view(torch.uint8).numpy().tobytes() if images.numel() else b"")
    return h.hexdigest()


def to_float(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images -> [-1, 1] (u / 127.5 - 1, computed as (2u - 255) / 255); float images unchanged."""
    if images.dtype == torch.uint8:
        return (images.to(torch.int16) * 2 - 255).to(dtype) / _CODE_SCALE
    return images.to(dtype)


def _codes_to_float(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if codes.dtype == torch.int16:
        return codes.to(dtype) / _CODE_SCALE
    return codes.to(dtype)


@dataclass
class Family:
    """Groups of query pixels that share one candidate set each; see the module docstring.

    query_pos [G, P]: flat pixel indices (row * W + col) of the queries of each group;
    cand_rows, cand_cols [G, S]: centres of the S candidate patches per training image of each group
    (empty for the 'whole' family of the ideal score, whose candidates are whole images).
    """

    name: str
    query_pos: torch.Tensor
    cand_rows: torch.Tensor
    cand_cols: torch.Tensor
    sq_norms: torch.Tensor | None = None  # [G, N*S] (implicit candidates), float64
    unique: torch.Tensor | None = None  # [G, U, D] codes (int16 for 8-bit images) or floats
    unique_log_mult: torch.Tensor | None = None  # [G, U], -inf marks padding
    unique_sq_norms: torch.Tensor | None = None  # [G, U] float64
    unique_source: torch.Tensor | None = None  # [G, U] id of the first occurrence

    @property
    def groups(self) -> int:
        return self.query_pos.shape[0]

    @property
    def positions_per_image(self) -> int:
        return max(1, self.cand_rows.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: v for n, v in vars(self).items() if isinstance(v, torch.Tensor)}

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> Family:
        return cls(name, **tensors)


def _family(name, query_pos, centres) -> Family:
    """A family from per-group lists of query pixels (flat) and of candidate centres (row, col)."""
    rows = torch.tensor([[r for r, _ in group] for group in centres], dtype=torch.long)
    cols = torch.tensor([[c for _, c in group] for group in centres], dtype=torch.long)
    return Family(name, torch.tensor(query_pos, dtype=torch.long), rows, cols)


def machine_families(machine: str, k: int, height: int, width: int) -> list[Family]:
    """The families (query groups and candidate centres) of a machine; see the module docstring."""
    if machine not in MACHINES:
        raise PatchIndexError(f"unknown machine {machine!r}; expected one of {', '.join(MACHINES)}")
    H, W = height, width
    if machine == "ideal":
        empty = torch.zeros(1, 0, dtype=torch.long)
        return [Family("whole", torch.zeros(1, 1, dtype=torch.long), empty, empty.clone())]
    check_patch_size(machine, k, H, W)
    d = k // 2
    pixels = [(r, c) for r in range(H) for c in range(W)]
    if machine == "ls":
        return [_family("local", [[r * W + c] for r, c in pixels], [[p] for p in pixels])]
    inside = [(r, c) for r in range(d, H - d) for c in range(d, W - d)]
    if machine == "els":
        return [_family("interior", [list(range(H * W))], [inside])]
    inner_rows, inner_cols = list(range(d, H - d)), list(range(d, W - d))
    edge_rows = [r for r in range(H) if r < d or r >= H - d]
    edge_cols = [c for c in range(W) if c < d or c >= W - d]
    families = []
    if inside:
        families.append(_family("interior", [[r * W + c for r, c in inside]], [inside]))
    if edge_rows and inner_cols:
        query = [[r * W + c for c in inner_cols] for r in edge_rows]
        families.append(_family("rows", query, [[(r, c) for c in inner_cols] for r in edge_rows]))
    if edge_cols and inner_rows:
        query = [[r * W + c for r in inner_rows] for c in edge_cols]
        families.append(_family("cols", query, [[(r, c) for r in inner_rows] for c in edge_cols]))
    corners = [(r, c) for r in edge_rows for c in edge_cols]
    if corners:
        families.append(
            _family("corners", [[r * W + c] for r, c in corners], [[p] for p in corners])
        )
    return families


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


def query_padding(machine: str) -> str:
    """ELS pads circularly (it models circular-padded CNNs); the others pad with zeros."""
    return "circular" if machine == "els" else "constant"


class PatchIndex:
    """The candidate sets of one machine at one patch size for one training set.

    Build once with `PatchIndex.build(images, machine, k)`, `save(path)`, `PatchIndex.load(path)`; the
    score functions and the sampler only read it. images: uint8 [N, C, H, W] (8-bit pixels, the
    pipeline's prepared data) or float [N, C, H, W] in [-1, 1].
    """

    def __init__(
        self,
        machine: str,
        k: int,
        images: torch.Tensor,
        families: list[Family],
        fingerprint: str | None = None,
        block_plans: dict[int, BlockPlan] | None = None,
    ):
        self.machine = machine
        self.k = k
        self.images = images
        self.families = families
        self.fingerprint = fingerprint or images_fingerprint(images)
        # family position -> its BlockPlan (certified pruning, els.blocks); CPU tensors
        self.block_plans = dict(block_plans or {})

    # ----------------------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        images: torch.Tensor,
        machine: str,
        k: int | None = None,
        *,
        dedup: bool | str = "auto",
        dedup_max_k: int = 7,
        dedup_max_fraction: float = 0.75,
        chunk_images: int = 256,
        blocks: bool | str = "auto",
        blocks_max_k: int = 9,
    ) -> PatchIndex:
        """Build the index of `machine` at patch size k (ignored for 'ideal').

        dedup: True, False or 'auto' (try for k <= dedup_max_k, keep if at most dedup_max_fraction of
        the candidates are distinct).
        blocks: True, False or 'auto' (k <= blocks_max_k): plan the interior family's candidate
        blocks for certified pruning at low noise (els.blocks; ELS and bbELS only).
        """
        if images.dim() != 4:
            raise PatchIndexError(
                f"training images must be [N, C, H, W], got shape {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise PatchIndexError("the training set is empty: a machine needs at least one image")
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise PatchIndexError(f"training images must be uint8 or float, got {images.dtype}")
        # built on the CPU whatever the images' device (as the pipeline's index stage does); move the
        # index with .to(device) for sampling
        images = images.detach().cpu().contiguous()
        H, W = images.shape[-2:]
        k = 0 if machine == "ideal" else k
        families = machine_families(machine, k, H, W)
        index = cls(machine, k, images, families)
        for fam in families:
            fam.sq_norms = index._implicit_sq_norms(fam, chunk_images)
            want = dedup is True or (dedup == "auto" and machine != "ideal" and k <= dedup_max_k)
            if want:
                index._try_dedup(fam, 1.0 if dedup is True else dedup_max_fraction)
        plan_blocks = blocks is True or (blocks == "auto" and k <= blocks_max_k)
        for i, fam in enumerate(families):
            if plan_blocks and machine in ("els", "bbels") and fam.name == "interior":
                centred, mu, log_mult = index._centred_candidates(fam, torch.float32)
                index.block_plans[i] = BlockPlan.build(centred, mu, log_mult)
        return index

    def _unfold_family(
        self,
        fam: Family,
        images: torch.Tensor,
        transposed: bool = False,
        workspace: Workspace | None = None,
    ) -> torch.Tensor:
        """Candidates of a family for a batch of float images, [G, n*S, D] in id order, or [G, D, n*S]
        (contiguous) with transposed=True: the layout the logits' matrix product reads fastest.
        workspace: write the transposed candidates into its "candidates" buffer."""
        n = images.shape[0]

        def contiguous(view: torch.Tensor, shape) -> torch.Tensor:
            if workspace is None:
                return view.reshape(shape)
            out = workspace.take("candidates", view.shape, view.dtype, view.device)
            return out.copy_(view).view(shape)

        if fam.name == "whole":
            flat = images.reshape(1, n, -1)
            return contiguous(flat.transpose(1, 2), (1, -1, n)) if transposed else flat
        k, d = self.k, self.k // 2
        padded = F.pad(images, (d, d, d, d)) if d else images
        # [n, C, H, W, k, k]: a view whose (r, c) entry is the zero-padded patch centred on (r, c)
        patches = padded.unfold(2, k, 1).unfold(3, k, 1)
        if fam.name == "interior" and transposed:
            # every fully-inside position, row-major: a rectangle of the view, copied once (no gather)
            H, W = images.shape[-2:]
            inside = patches[:, :, d : H - d, d : W - d]  # [n, C, H-2d, W-2d, k, k]
            shape = (1, -1, n * (H - 2 * d) * (W - 2 * d))
            return contiguous(inside.permute(1, 4, 5, 0, 2, 3), shape)
        picked = patches[:, :, fam.cand_rows, fam.cand_cols]  # [n, C, G, S, k, k], one gather
        G, S = fam.cand_rows.shape
        if transposed:
            return contiguous(picked.permute(2, 1, 4, 5, 0, 3), (G, -1, n * S))
        return picked.permute(2, 0, 3, 1, 4, 5).reshape(G, n * S, -1)

    def _implicit_sq_norms(self, fam: Family, chunk_images: int) -> torch.Tensor:
        parts = []
        for i in range(0, self.images.shape[0], chunk_images):
            cand = self._unfold_family(
                fam, to_float(self.images[i : i + chunk_images], torch.float64)
            )
            parts.append(cand.square().sum(dim=2))
        return torch.cat(parts, dim=1)

    def _try_dedup(self, fam: Family, max_fraction: float) -> None:
        # exact duplicates are found on integer codes (8-bit images) or on the floats themselves
        if self.images.dtype == torch.uint8:
            codes = self._unfold_family(fam, to_float(self.images, torch.float32) * _CODE_SCALE)
            codes = codes.round().to(torch.int16)
        else:
            codes = self._unfold_family(fam, self.images)
        G, M, D = codes.shape
        uniques, counts, firsts = [], [], []
        for g in range(G):
            u, inverse, count = torch.unique(
                codes[g], dim=0, return_inverse=True, return_counts=True
            )
            first = torch.full((u.shape[0],), M, dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(M), reduce="amin")
            # order unique patches by first occurrence: deterministic and close to the implicit order
            order = torch.argsort(first)
            uniques.append(u[order])
            counts.append(count[order])
            firsts.append(first[order])
        U = max(u.shape[0] for u in uniques)
        if U > max_fraction * M:
            return
        unique = codes.new_zeros((G, U, D))
        log_mult = torch.full((G, U), float("-inf"), dtype=torch.float64)
        source = torch.zeros((G, U), dtype=torch.long)
        for g in range(G):
            n = uniques[g].shape[0]
            unique[g, :n] = uniques[g]
            log_mult[g, :n] = counts[g].double().log()
            source[g, :n] = firsts[g]
        fam.unique, fam.unique_log_mult, fam.unique_source = unique, log_mult, source
        fam.unique_sq_norms = _codes_to_float(unique, torch.float64).square().sum(dim=2)

    # ----------------------------------------------------------------------------- reading
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.images.shape)

    def candidate_count(self) -> int:
        """Candidates per query group summed over families (before deduplication)."""
        n = self.images.shape[0]
        return sum(f.groups * n * f.positions_per_image for f in self.families)

    def stored_candidate_count(self) -> int:
        """Candidates the softmax actually visits (after deduplication)."""
        n = self.images.shape[0]
        return sum(
            f.groups * (f.unique.shape[1] if f.unique is not None else n * f.positions_per_image)
            for f in self.families
        )

    def chunks(
        self,
        fam: Family,
        dtype: torch.dtype,
        device: torch.device,
        max_candidates: int,
        workspace: Workspace | None = None,
    ) -> Iterator[CandidateChunk]:
        """Candidate chunks of a family, at most max_candidates per group, converted to dtype on device.

        Materialised families (see materialize) yield views of the explicit, centred candidates.
        With a workspace, a chunk's candidates live in its buffers: each chunk is valid until the
        next one is requested."""
        mat = self.materialized(fam)
        if mat is not None:
            patches_t, centres_t, sq, log_mult, _ = mat
            M = patches_t.shape[2]
            step = max(1, max_candidates)
            for m0 in range(0, M, step):
                yield CandidateChunk(
                    patches_t=patches_t[:, :, m0 : m0 + step],
                    centres_t=centres_t[:, :, m0 : m0 + step],
                    sq_norms=sq[:, m0 : m0 + step],
                    log_mult=None if log_mult is None else log_mult[:, m0 : m0 + step],
                    first_id=m0,
                )
            return
        if fam.unique is not None:
            U = fam.unique.shape[1]
            step = max(1, max_candidates)
            for u0 in range(0, U, step):
                codes = fam.unique[:, u0 : u0 + step].to(device).transpose(1, 2)
                if workspace is None:
                    patches_t = _codes_to_float(codes, dtype).contiguous()
                else:  # the same conversion, written into the buffer
                    patches_t = workspace.take("candidates", codes.shape, dtype, device)
                    patches_t.copy_(codes)
                    if codes.dtype == torch.int16:
                        patches_t.div_(_CODE_SCALE)
                yield CandidateChunk(
                    patches_t=patches_t,
                    centres_t=self._centres_t(fam, patches_t),
                    sq_norms=fam.unique_sq_norms[:, u0 : u0 + step].to(device, dtype),
                    log_mult=fam.unique_log_mult[:, u0 : u0 + step].to(device, dtype),
                    first_id=u0,
                )
            return
        S = fam.positions_per_image
        step = max(1, max_candidates // S)
        for i0 in range(0, self.images.shape[0], step):
            imgs = to_float(self.images[i0 : i0 + step].to(device), dtype)
            patches_t = self._unfold_family(fam, imgs, transposed=True, workspace=workspace)
            yield CandidateChunk(
                patches_t=patches_t,
                centres_t=self._centres_t(fam, patches_t),
                sq_norms=fam.sq_norms[:, i0 * S : (i0 + imgs.shape[0]) * S].to(device, dtype),
                log_mult=None,
                first_id=i0 * S,
            )

    # ----------------------------------------------------------------------------- dot products
    def computes_own_dots(self, fam: Family) -> bool:
        """Families whose dot products are cheaper without explicit candidate patches: an edge row or
        column (few queries per candidate: a grouped convolution over image strips) and one-position
        groups (corners, LS: box sums of the query-image product). Deduplicated or materialised
        candidates keep the matrix product."""
        return (
            fam.name in ("rows", "cols", "corners", "local")
            and fam.unique is None
            and self.materialized(fam) is None
        )

    def dot_chunks(
        self,
        fam: Family,
        queries: torch.Tensor,
        x: torch.Tensor,
        max_candidates: int,
    ) -> Iterator[CandidateChunk]:
        """Like chunks(), with the query-candidate dot products [G, B*P, M] computed here (see
        computes_own_dots) instead of candidate patches. queries [G, B*P, D]: the query patches,
        image-major in each group as els.machines builds them; x [B, C, H, W]: the noisy images.
        Every product is computed per image of the batch (batching cannot change the rounding)."""
        dtype, device = x.dtype, x.device
        B, C = x.shape[:2]
        G, S = fam.cand_rows.shape
        k, d = self.k, self.k // 2
        P = queries.shape[1] // B
        step = max(1, max_candidates // S)
        rows, cols = fam.cand_rows.to(device), fam.cand_cols.to(device)
        if fam.name in ("corners", "local"):
            # <q, c> over the k x k window at pixel p = the window sum of x * image (zero padded),
            # from 2-D prefix sums in float64 (their cancellation would cost float32 digits)
            xp = F.pad(x.double(), (d, d, d, d))
            r, c = rows[:, 0], cols[:, 0]
        elif fam.name in ("rows", "cols"):
            # the edge row (column) of each group, as ints once: no device sync per chunk
            edge_lines = (fam.cand_rows if fam.name == "rows" else fam.cand_cols)[:, 0].tolist()
        for i0 in range(0, self.images.shape[0], step):
            imgs = to_float(self.images[i0 : i0 + step].to(device), dtype)
            n = imgs.shape[0]
            padded = F.pad(imgs, (d, d, d, d)) if d else imgs
            # what does not depend on the query image is built once per chunk, not per image
            if fam.name in ("corners", "local"):
                padded64 = padded.double()
            elif fam.name == "rows":
                # strips of the k padded rows around each edge row, only as wide as the candidates
                # reach (their centres are the interior columns): [n, G*C, k, W]
                H, W = imgs.shape[-2:]
                strips = [padded[:, :, r : r + k, d : d + W] for r in edge_lines]
                strips = torch.cat(strips, 1)
            else:
                # cols: the same strips around each edge column, transposed so that the convolution
                # runs along the strip's length as for rows (twice as fast as a k-wide, H-tall
                # strip): [n, G*C, k, H]
                H, W = imgs.shape[-2:]
                strips = [padded[:, :, d : d + H, c : c + k] for c in edge_lines]
                strips = torch.cat(strips, 1).transpose(2, 3).contiguous()
            per_image = []
            for b in range(B):
                if fam.name in ("corners", "local"):
                    prod = (padded64 * xp[b : b + 1]).sum(dim=1)  # [n, Hp, Wp]
                    cs = F.pad(prod.cumsum(1).cumsum(2), (1, 0, 1, 0))
                    win = cs[:, r + k, c + k] - cs[:, r, c + k] - cs[:, r + k, c] + cs[:, r, c]
                    per_image.append(win.to(dtype).t().unsqueeze(1))  # [G, 1, n]
                    continue
                w = queries[:, b * P : (b + 1) * P].reshape(G * P, C, k, k)
                if fam.name == "cols":
                    w = w.transpose(2, 3)  # the query patches, transposed as the strips are
                # [n, G*P, S]: one output per interior column (rows) or row (cols), in id order
                out = F.conv2d(strips, w, groups=G)[:, :, 0, :]
                per_image.append(out.view(n, G, P, S).permute(1, 2, 0, 3).reshape(G, P, n * S))
            centres = imgs[:, :, rows, cols]  # [n, C, G, S]
            centres = centres.permute(2, 1, 0, 3).reshape(G, C, n * S)
            yield CandidateChunk(
                patches_t=None,
                centres_t=torch.cat([centres, centres.new_ones(G, 1, n * S)], dim=1),
                sq_norms=fam.sq_norms[:, i0 * S : (i0 + n) * S].to(device, dtype),
                log_mult=None,
                first_id=i0 * S,
                dots=torch.cat(per_image, dim=1),
            )

    # ----------------------------------------------------------------------------- materialised
    def materialized_bytes(self, dtype: torch.dtype) -> int:
        """Bytes that materialize() needs for every family at dtype (patches, centres, norms)."""
        elt = torch.finfo(dtype).bits // 8
        n, total = self.images.shape[0], 0
        C = self.images.shape[1]
        for fam in self.families:
            M = fam.unique.shape[1] if fam.unique is not None else n * fam.positions_per_image
            D = (
                C * self.images.shape[2] * self.images.shape[3]
                if fam.name == "whole"
                else (C * self.k * self.k)
            )
            E = D if fam.name == "whole" else C
            total += fam.groups * M * (D + E + 3) * elt
        return total

    def materialize(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Keep every family's candidates as explicit floats on device, CENTRED on the family's mean
        candidate mu (per group): patches c - mu, squared norms ||c - mu||^2 (from float64). The
        softmax then sees q - a mu against c - mu: the same distances ||q - a c||^2, with far less
        cancellation in float32 (the logits stay small). Reused by chunks() until release()."""
        device = torch.device(device)
        key = (dtype, device)
        if getattr(self, "_materialized", None) is not None and self._materialized[0] == key:
            return
        self.release()
        out = []
        for fam in self.families:
            if fam.unique is not None:
                cand = _codes_to_float(fam.unique.to(device), torch.float64)
                log_mult = fam.unique_log_mult.to(device, dtype)
                weight = torch.exp(fam.unique_log_mult.to(device))  # 0 on padding
                mu = (cand * weight.unsqueeze(2)).sum(1) / weight.sum(1, keepdim=True)
                centred = (cand - mu.unsqueeze(1)) * (weight > 0).unsqueeze(2)  # padding: 0
                out.append(
                    (
                        centred.to(dtype).transpose(1, 2).contiguous(),
                        self._centres_t(fam, cand.to(dtype).transpose(1, 2)),
                        centred.square().sum(dim=2).to(dtype),
                        log_mult,
                        mu.to(dtype),
                    )
                )
                continue
            # implicit candidates: two passes over image chunks (the mean, then the centred floats)
            images = self.images.to(device)
            N, step = images.shape[0], 256

            def unfold(i, fam=fam, images=images, step=step):
                return self._unfold_family(fam, to_float(images[i : i + step], torch.float64))

            total = None
            for i in range(0, N, step):
                part = unfold(i).sum(dim=1)
                total = part if total is None else total + part
            S = fam.positions_per_image
            mu = total / (N * S)
            G, D = mu.shape
            E = D if fam.name == "whole" else self.images.shape[1]
            patches_t = torch.empty(G, D, N * S, dtype=dtype, device=device)
            centres_t = torch.empty(G, E + 1, N * S, dtype=dtype, device=device)
            sq = torch.empty(G, N * S, dtype=dtype, device=device)
            for i in range(0, N, step):
                cand = unfold(i)
                sl = slice(i * S, i * S + cand.shape[1])
                centred = cand - mu.unsqueeze(1)
                patches_t[:, :, sl] = centred.transpose(1, 2)
                sq[:, sl] = centred.square().sum(dim=2)
                centres_t[:, :, sl] = self._centres_t(fam, cand.transpose(1, 2))
            out.append((patches_t, centres_t, sq, None, mu.to(dtype)))
        self._materialized = (key, out)

    def release(self) -> None:
        """Drop the materialised candidates (see materialize) and candidate blocks."""
        self._materialized = None
        self._blocks = None

    # ----------------------------------------------------------------------------- blocks
    def blocks_bytes(self, fam: Family, dtype: torch.dtype) -> int:
        """Memory candidate_blocks(fam) keeps."""
        n, C = self.images.shape[:2]
        M = fam.unique.shape[1] if fam.unique is not None else n * fam.positions_per_image
        return CandidateBlocks.nbytes(M, C * self.k * self.k, C, dtype)

    def block_plan(self, fam: Family) -> BlockPlan | None:
        """The family's BlockPlan, if the index was built with one."""
        return self.block_plans.get(self.families.index(fam))

    def _centred_candidates(self, fam: Family, dtype: torch.dtype):
        """A one-group family's candidates in id order, explicit, for planning its blocks: (c - mu
        [M, D] in dtype, mu [D] float64 (the multiplicity-weighted mean), log multiplicities [M]
        float64 or None)."""
        if fam.unique is not None:
            cand = _codes_to_float(fam.unique[0], torch.float64)
            log_mult = fam.unique_log_mult[0]
            if bool((log_mult == float("-inf")).any()):
                raise PatchIndexError("a one-group family has no padding candidates")
            weight = torch.exp(log_mult)
            mu = (cand * weight.unsqueeze(1)).sum(0) / weight.sum()
            return (cand - mu).to(dtype), mu, log_mult
        N, step = self.images.shape[0], 256

        def unfold(i):
            return self._unfold_family(fam, to_float(self.images[i : i + step], torch.float64))[0]

        S = fam.positions_per_image
        mu = sum(unfold(i).sum(0) for i in range(0, N, step)) / (N * S)
        centred = torch.empty(N * S, mu.shape[0], dtype=dtype)
        for i in range(0, N, step):  # filled in place: never a second full-size copy
            part = unfold(i)
            centred[i * S : i * S + part.shape[0]] = part - mu
        return centred, mu, None

    def candidate_blocks(
        self, fam: Family, dtype: torch.dtype, device: torch.device | str
    ) -> CandidateBlocks:
        """The family's candidates in the blocks of its BlockPlan, explicit in dtype on device, built
        on first use and kept (one family at a time) until release()."""
        plan = self.block_plan(fam)
        if plan is None:
            raise PatchIndexError(
                f"the {fam.name} family at k={self.k} has no block plan: build the index with "
                "blocks=True"
            )
        device = torch.device(device)
        key = (self.families.index(fam), dtype, device)
        cached = getattr(self, "_blocks", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._blocks = None
        C, k, d = self.images.shape[1], self.k, self.k // 2
        centre = torch.arange(C, device=device) * k * k + d * k + d
        if fam.unique is not None:
            unique = fam.unique[0].to(device)

            def rows(ids):
                return _codes_to_float(unique[ids], torch.float64)

            log_mult = fam.unique_log_mult[0]
        else:
            # plans exist for the interior family only (build): its fully-inside patches, gathered
            # from the stored (8-bit) images, unpadded, and converted after the gather (an eighth of
            # the bytes of a gather from float64 images)
            patches = self.images.to(device).unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H-2d, ...]
            S = fam.positions_per_image
            in_r, in_c = fam.cand_rows[0].to(device) - d, fam.cand_cols[0].to(device) - d

            def rows(ids):
                n, s = ids // S, ids % S
                picked = patches[n, :, in_r[s], in_c[s]].reshape(ids.shape[0], -1)
                return to_float(picked, torch.float64)

            log_mult = None

        blocks = CandidateBlocks.from_plan(plan, rows, centre, log_mult, dtype, device)
        self._blocks = (key, blocks)
        return blocks

    def materialized(self, fam: Family):
        """(patches_t [G, D, M], centres_t [G, E + 1, M], sq_norms, log_mult, mu) of fam if
        materialised, else None."""
        m = getattr(self, "_materialized", None)
        if m is None:
            return None
        return m[1][self.families.index(fam)]

    def _centres_t(self, fam: Family, patches_t: torch.Tensor) -> torch.Tensor:
        """[G, E + 1, M]: each candidate's centre value(s) (the whole image for the ideal score), then a
        row of ones (one product then gives the weighted sums and the normaliser); patches_t [G, D, M]."""
        G, D, M = patches_t.shape
        if fam.name == "whole":
            centres = patches_t
        else:
            C, k, d = D // (self.k * self.k), self.k, self.k // 2
            centre = torch.arange(C, device=patches_t.device) * k * k + d * k + d
            centres = patches_t.index_select(1, centre)
        return torch.cat([centres, patches_t.new_ones(G, 1, M)], dim=1)

    def source_of(self, fam: Family, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Candidate ids [G, P] of a family -> (image, row, col) of each candidate patch's centre."""
        if fam.unique is not None:
            ids = torch.gather(fam.unique_source, 1, ids)
        if fam.name == "whole":
            return ids, None, None
        S = fam.positions_per_image
        image, s = ids // S, ids % S
        return image, torch.gather(fam.cand_rows, 1, s), torch.gather(fam.cand_cols, 1, s)

    def to(self, device: torch.device | str) -> PatchIndex:
        """This index with every tensor on `device` (itself if already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        families = [
            Family.from_tensors(f.name, {n: t.to(device) for n, t in f.tensors().items()})
            for f in self.families
        ]
        return PatchIndex(
            self.machine,
            self.k,
            self.images.to(device),
            families,
            self.fingerprint,
            self.block_plans,
        )

    def check(self, machine: str, k: int | None = None, images: torch.Tensor | None = None) -> None:
        """Refuse to use this index for another machine, patch size or training set."""
        k = 0 if machine == "ideal" else k
        if machine != self.machine or k != self.k:
            raise PatchIndexError(
                f"index is for machine {self.machine!r} at k={self.k}, not {machine!r} at k={k}"
            )
        if images is not None and images_fingerprint(images) != self.fingerprint:
            raise PatchIndexError(
                f"index ({self.machine}, k={self.k}) was built from another training set "
                f"(fingerprint {self.fingerprint[:12]}... differs)"
            )

    # ----------------------------------------------------------------------------- files
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images.cpu().contiguous()}
        for i, fam in enumerate(self.families):
            for name, t in fam.tensors().items():
                out[f"family{i}.{name}"] = t.cpu().contiguous()
            if i in self.block_plans:
                for name, t in self.block_plans[i].tensors().items():
                    out[f"family{i}.plan.{name}"] = t.cpu().contiguous()
        return out

    @staticmethod
    def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def save(self, path: str | Path) -> None:
        """Write the index as safetensors (no pickle), atomically, with a content checksum."""
        from .safetensors_file import save_file  # sorted metadata: same bytes every run

        tensors = self._tensors()
        meta = {
            "format": "els.PatchIndex",
            "format_version": str(FORMAT_VERSION),
            "machine": self.machine,
            "k": str(self.k),
            "fingerprint": self.fingerprint,
            "families": json.dumps([f.name for f in self.families]),
            "content_sha256": self._content_hash(tensors),
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

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
        if verify and cls._content_hash(tensors) != meta.get("content_sha256"):
            raise PatchIndexError(
                f"patch index {path} is corrupt: its content checksum does not match"
            )
        families, plans = [], {}
        for i, name in enumerate(json.loads(meta["families"])):
            prefix, plan_prefix = f"family{i}.", f"family{i}.plan."
            fields = {
                n[len(prefix) :]: t
                for n, t in tensors.items()
                if n.startswith(prefix) and not n.startswith(plan_prefix)
            }
            families.append(Family.from_tensors(name, fields))
            plan = {
                n[len(plan_prefix) :]: t for n, t in tensors.items() if n.startswith(plan_prefix)
            }
            if plan:
                plans[i] = BlockPlan.from_tensors(plan)
        index = cls(meta["machine"], int(meta["k"]), tensors["images"], families, block_plans=plans)
        if index.fingerprint != meta["fingerprint"]:
            raise PatchIndexError(
                f"patch index {path} is corrupt: its images do not match their fingerprint"
            )
        if machine is not None:
            index.check(machine, k, images)
        elif images is not None:
            index.check(index.machine, index.k, images)
        return index
