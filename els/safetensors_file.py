"""Byte-reproducible safetensors files.

``safetensors`` writes the ``__metadata__`` map of the header in a random order per process (its
Rust side keeps metadata in a ``HashMap``; safetensors issue #584), so saving the same tensors and
metadata twice gives files with different bytes. ``save_file`` here saves with
``safetensors.torch.save_file`` and then rewrites the header with the metadata keys sorted (the
tensor entries, which safetensors already orders deterministically, are kept as they are), so a
rerun, a resumed run or a run on another machine of the cluster writes the same bytes.

The rewrite happens in place in the file just written (normally a temporary file that the caller
renames into place afterwards): the sorted header has the same length as the original one, so the
tensor data is not moved. Should the length ever differ, the file is rewritten whole.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

HEADER_LENGTH = struct.Struct("<Q")


def canonical_header(header: Mapping) -> dict:
    """The header with ``__metadata__`` first and its keys sorted; tensor entries in file order."""
    out: dict = {}
    if "__metadata__" in header:
        metadata = header["__metadata__"]
        out["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    out.update((k, v) for k, v in header.items() if k != "__metadata__")
    return out


def canonicalize(path: str | os.PathLike) -> None:
    """Rewrite the header of the safetensors file at ``path`` in canonical order."""
    path = Path(path)
    with path.open("r+b") as stream:
        (length,) = HEADER_LENGTH.unpack(stream.read(HEADER_LENGTH.size))
        raw = stream.read(length)
        header = json.loads(raw)
        text = json.dumps(canonical_header(header), separators=(",", ":"), ensure_ascii=False)
        encoded = text.encode("utf-8")
        if len(encoded) <= length:
            padded = encoded + b" " * (length - len(encoded))
            if padded != raw:
                stream.seek(HEADER_LENGTH.size)
                stream.write(padded)
            return
    # Longer than the original header (never seen: same content, other order): rewrite whole.
    padding = (-(HEADER_LENGTH.size + len(encoded))) % 8
    encoded += b" " * padding
    from .io import atomic_path

    with atomic_path(path) as rewritten, path.open("rb") as source, rewritten.open("wb") as target:
        source.seek(HEADER_LENGTH.size + length)
        target.write(HEADER_LENGTH.pack(len(encoded)) + encoded)
        shutil.copyfileobj(source, target, 1 << 20)


def save_file(tensors, filename: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """``safetensors.torch.save_file`` with a canonical (sorted-metadata) header."""
    from safetensors.torch import save_file as _save_file

    _save_file(tensors, str(filename), metadata=dict(metadata) if metadata is not None else None)
    canonicalize(filename)
