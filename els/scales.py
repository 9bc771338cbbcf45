"""Patch-size schedules: plain-text files in scales/, one odd patch size per reverse step.

File format: '#' starts a comment; the remaining whitespace-separated integers, in order, are
scales[0] .. scales[n-1] (scales[i] is the patch size used at step i, t = i / n).
"""

from __future__ import annotations

from pathlib import Path

from .io import write_text


class ScheduleError(ValueError):
    """A patch-size schedule that cannot be used, with the file and entry that is wrong."""


def validate_scales(scales, *, source: str = "schedule", max_k: int | None = None) -> list[int]:
    """Check that every entry is a positive odd int (and <= max_k if given); return them as ints."""
    scales = list(scales)
    if len(scales) < 2:
        raise ScheduleError(f"{source}: needs at least 2 patch sizes, got {len(scales)}")
    out = []
    for i, k in enumerate(scales):
        if isinstance(k, bool) or not isinstance(k, int) or k != int(k):
            raise ScheduleError(f"{source}: entry {i} is {k!r}, not an integer patch size")
        k = int(k)
        if k <= 0 or k % 2 == 0:
            raise ScheduleError(f"{source}: entry {i} is {k}; patch sizes must be odd and positive")
        if max_k is not None and k > max_k:
            raise ScheduleError(f"{source}: entry {i} is {k}, larger than the allowed {max_k}")
        out.append(k)
    return out


def parse_scales(text: str, *, source: str = "schedule") -> list[int]:
    """Parse the text of a schedule file (see module docstring)."""
    values = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        for token in line.replace(",", " ").split():
            try:
                values.append(int(token))
            except ValueError:
                raise ScheduleError(
                    f"{source}, line {lineno}: {token!r} is not an integer patch size"
                ) from None
    return validate_scales(values, source=source)


def read_scales(path: str | Path, *, expected_length: int | None = None) -> list[int]:
    """Read and validate a schedule file; optionally require a number of entries."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"schedule file {path} does not exist")
    scales = parse_scales(path.read_text(), source=str(path))
    if expected_length is not None and len(scales) != expected_length:
        raise ScheduleError(f"{path}: has {len(scales)} patch sizes, expected {expected_length}")
    return scales


def write_scales(path: str | Path, scales, *, comment: str = "") -> None:
    """Write a schedule file (comment lines first), atomically."""
    scales = validate_scales(scales)
    path = Path(path)
    lines = [f"# {c}" for c in comment.splitlines()] if comment else []
    lines.append(" ".join(str(k) for k in scales))
    write_text(path, "\n".join(lines) + "\n")
