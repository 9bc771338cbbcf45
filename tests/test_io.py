"""els.io: the one atomic writer and the one content hasher every module uses."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest
import torch

from els.io import (
    ContentHasher,
    atomic_path,
    content_sha256,
    copy_file,
    read_safetensors,
    write_bytes,
    write_safetensors,
    write_text,
    write_with,
)


def test_atomic_path_renames_on_success_with_the_requested_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target, mode=0o640) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.txt.")
        assert tmp.suffix == ".tmp" and tmp.exists()
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(target.parent) == ["out.txt"]


def test_a_failing_writer_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = write_text(tmp_path / "out.txt", "old")

    def half_then_crash(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_with(target, half_then_crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_stale_temporaries_of_a_killed_writer_are_removed_and_others_kept(tmp_path):
    (tmp_path / ".out.txt.abc123.tmp").write_text("left by a SIGKILL")
    (tmp_path / ".other.txt.abc123.tmp").write_text("another output's writer")
    write_with(tmp_path / "out.txt", lambda tmp: tmp.write_bytes(b"\x00\x01"), fsync=True)
    assert sorted(os.listdir(tmp_path)) == [".other.txt.abc123.tmp", "out.txt"]
    assert (tmp_path / "out.txt").read_bytes() == b"\x00\x01"


def test_copy_file_copies_contents_atomically(tmp_path):
    source = write_bytes(tmp_path / "a.bin", bytes(range(256)))
    copy = copy_file(source, tmp_path / "copies" / "b.bin")
    assert copy.read_bytes() == bytes(range(256))


def test_write_safetensors_is_byte_reproducible_and_round_trips(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"view": base.t(), "ints": torch.tensor([3, 1, 2])}  # a non-contiguous view
    meta = {"z": "last", "a": [1, 2], "format": "x"}
    first = write_safetensors(tmp_path / "one.safetensors", tensors, meta).read_bytes()
    second = write_safetensors(tmp_path / "two.safetensors", dict(reversed(tensors.items())), meta)
    assert second.read_bytes() == first
    loaded, metadata = read_safetensors(second)
    assert torch.equal(loaded["view"], base.t()) and torch.equal(loaded["ints"], tensors["ints"])
    assert metadata == {"z": "last", "a": "[1, 2]", "format": "x"}


def test_content_sha256_of_a_tensor_describes_dtype_and_shape():
    x = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    expected = hashlib.sha256(b"torch.uint8|(2, 3)|" + bytes(range(6))).hexdigest()
    assert content_sha256(x) == expected
    assert content_sha256(x.reshape(3, 2)) != expected  # same bytes, other shape
    assert content_sha256(x.t().contiguous().t()) == expected  # layout does not matter
    assert content_sha256(x, describe=False) == hashlib.sha256(bytes(range(6))).hexdigest()
    assert content_sha256(x.numpy(), describe=False) == content_sha256(x, describe=False)


def test_content_sha256_of_named_tensors_sorts_the_names():
    a, b = torch.zeros(2, dtype=torch.float32), torch.tensor(7, dtype=torch.int64)
    h = hashlib.sha256()
    h.update(b"a|torch.float32|(2,)|" + a.numpy().tobytes())
    h.update(b"b|torch.int64|()|" + b.numpy().tobytes())
    assert content_sha256({"b": b, "a": a}) == content_sha256({"a": a, "b": b}) == h.hexdigest()
    empty = torch.zeros(0, 3)
    assert content_sha256({"e": empty}) == hashlib.sha256(b"e|torch.float32|(0, 3)|").hexdigest()


def test_content_hasher_chains_text_and_tensors_in_order():
    labels = torch.tensor([1, 0], dtype=torch.int64)
    got = ContentHasher().text("abc").tensor(labels, describe=False).hexdigest()
    assert got == hashlib.sha256(b"abc" + labels.numpy().tobytes()).hexdigest()
    bf16 = torch.ones(3, dtype=torch.bfloat16)  # a dtype numpy does not have
    assert content_sha256(bf16) != content_sha256(bf16.float())


def test_content_sha256_names_what_it_cannot_hash():
    with pytest.raises(TypeError, match="got list"):
        content_sha256([1, 2, 3])


def test_prepared_data_hash_is_the_bytes_only_hash():
    """els.data records images_sha256 as the sha256 of the raw bytes: existing files still verify."""
    from els.data import _sha256_of_array

    images = np.random.default_rng(0).integers(0, 256, (2, 1, 4, 4), dtype=np.uint8)
    assert _sha256_of_array(images) == hashlib.sha256(images.tobytes()).hexdigest()
    assert (
        _sha256_of_array(torch.from_numpy(images)) == hashlib.sha256(images.tobytes()).hexdigest()
    )


def test_cnn_data_fingerprint_is_unchanged():
    """Checkpoints record data_fingerprint; the hash scheme must not move under them."""
    from els.cnn.train import data_fingerprint

    images = torch.arange(8, dtype=torch.uint8).reshape(2, 1, 2, 2)
    labels = torch.tensor([0, 1])
    inner = hashlib.sha256(b"torch.uint8|(2, 1, 2, 2)|" + bytes(range(8))).hexdigest()
    expected = hashlib.sha256(inner.encode() + labels.numpy().astype(np.int64).tobytes())
    assert data_fingerprint(images, labels) == expected.hexdigest()
    assert data_fingerprint(images, None) == hashlib.sha256(inner.encode()).hexdigest()


def test_index_fingerprints_are_content_sha256():
    """els.index's fingerprint of the training images and checksum of an index file's images are
    this scheme: the sha256 of the description and the bytes, by hand."""
    import hashlib

    from els.index import PatchIndex, images_fingerprint

    images = torch.randint(0, 256, (3, 1, 5, 5), dtype=torch.uint8)
    by_hand = hashlib.sha256(b"torch.uint8|(3, 1, 5, 5)|" + images.numpy().tobytes()).hexdigest()
    assert images_fingerprint(images) == content_sha256(images) == by_hand
    named = hashlib.sha256(b"images|torch.uint8|(3, 1, 5, 5)|" + images.numpy().tobytes())
    assert PatchIndex._content_hash(images) == named.hexdigest()
