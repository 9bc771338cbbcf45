"""els.safetensors_file: safetensors files with the same bytes every time (sorted metadata)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from els.safetensors_file import canonicalize, save_file

WRITE = """
import sys, torch
from els.safetensors_file import save_file
tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.arange(4, dtype=torch.uint8)}
save_file(tensors, sys.argv[1], {f"key{i}": "v" * i + "\\u00e9" for i in range(20)})
"""


def header(path: Path) -> dict:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def test_two_processes_write_the_same_bytes(tmp_path):
    """safetensors alone orders metadata at random per process; save_file does not."""
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(path)], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    meta = header(paths[0])["__metadata__"]
    assert list(meta) == sorted(meta) and len(meta) == 20
    with safe_open(str(paths[0]), framework="pt") as f:
        assert torch.equal(f.get_tensor("b"), torch.arange(6.0).reshape(2, 3))
        assert f.metadata()["key3"] == "vvv\u00e9"


def test_canonicalize_is_idempotent_and_keeps_the_data(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.ones(3)}, path, {"z": "1", "a": "2"})
    before = path.read_bytes()
    canonicalize(path)
    assert path.read_bytes() == before
    assert list(header(path)) == ["__metadata__", "x"]


def test_no_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.ones(3)}, path)
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("x"), torch.ones(3))
