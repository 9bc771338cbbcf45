"""PatchIndex: built once, saved, loaded, refused when corrupt or mismatched."""

import pytest
import torch
from reference import random_8bit_images, random_images

import els
from els.index import PatchIndexError


@pytest.mark.parametrize(
    "kind,k", [("ideal", None), ("ls", 3), ("els", 5), ("bbels", 3), ("bbels", 5)]
)
def test_save_load_round_trip_gives_identical_scores(tmp_path, kind, k):
    train = random_8bit_images(6, 2, 8, 8, seed=1)
    x = random_images(2, 2, 8, 8, seed=2, dtype=torch.float32)
    index = els.PatchIndex.build(train, kind, k)
    index.save(tmp_path / "index.safetensors")
    loaded = els.PatchIndex.load(tmp_path / "index.safetensors", machine=kind, k=k, images=train)
    assert loaded.ks == index.ks and loaded.fingerprint == index.fingerprint
    for t in (0.1, 0.6):
        assert torch.equal(els.denoise(index, x, t), els.denoise(loaded, x, t))


def test_float_training_set_round_trip(tmp_path):
    train = random_images(3, 1, 7, 7)
    index = els.PatchIndex.build(train, "bbels", 3)
    index.save(tmp_path / "i.safetensors")
    loaded = els.PatchIndex.load(tmp_path / "i.safetensors")
    x = random_images(1, 1, 7, 7, seed=3)
    assert torch.equal(els.denoise(index, x, 0.5), els.denoise(loaded, x, 0.5))


def test_corrupted_file_is_refused(tmp_path):
    train = random_8bit_images(4, 1, 8, 8)
    path = tmp_path / "i.safetensors"
    els.PatchIndex.build(train, "bbels", 3).save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the tensor data, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(PatchIndexError, match="corrupt"):
        els.PatchIndex.load(path)


def test_truncated_file_is_refused(tmp_path):
    train = random_8bit_images(4, 1, 8, 8)
    path = tmp_path / "i.safetensors"
    els.PatchIndex.build(train, "ls", 3).save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PatchIndexError, match="not a readable safetensors file"):
        els.PatchIndex.load(path)


def test_not_an_index_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PatchIndexError, match="not an els patch index"):
        els.PatchIndex.load(tmp_path / "other.safetensors")
    with pytest.raises(PatchIndexError, match="does not exist"):
        els.PatchIndex.load(tmp_path / "missing.safetensors")


def test_mismatched_index_is_refused(tmp_path):
    train = random_8bit_images(4, 1, 8, 8, seed=1)
    other = random_8bit_images(4, 1, 8, 8, seed=2)
    path = tmp_path / "i.safetensors"
    els.PatchIndex.build(train, "bbels", 3).save(path)
    with pytest.raises(PatchIndexError, match=r"machine 'bbels' at k=\[3\], not 'els' at k=3"):
        els.PatchIndex.load(path, machine="els", k=3)
    with pytest.raises(PatchIndexError, match="not 'bbels' at k=5"):
        els.PatchIndex.load(path, machine="bbels", k=5)
    with pytest.raises(PatchIndexError, match="another training set"):
        els.PatchIndex.load(path, machine="bbels", k=3, images=other)
    index = els.PatchIndex.load(path)
    with pytest.raises(PatchIndexError, match=r"needs 'bbels' at k=\[5\] \(missing \[5\]\)"):
        els.sample("bbels", None, [3, 5, 5], torch.zeros(1, 1, 8, 8), index=index)


def test_one_index_serves_every_k_of_a_schedule(tmp_path):
    """One file per (machine, class) for the whole schedule; each k as its own index would give."""
    train = random_8bit_images(5, 1, 9, 9, seed=4)
    x = random_images(2, 1, 9, 9, seed=5, dtype=torch.float64)
    scales = [9, 3, 5, 5, 7]
    index = els.PatchIndex.build(train, "bbels", els.schedule_patch_sizes("bbels", scales))
    assert index.ks == (3, 5, 7)
    index.save(tmp_path / "i.safetensors")
    loaded = els.PatchIndex.load(tmp_path / "i.safetensors", machine="bbels", k=5)
    for k in (3, 5, 7):
        alone = els.PatchIndex.build(train, "bbels", k)
        assert torch.equal(els.denoise(loaded, x, 0.3, k), els.denoise(alone, x, 0.3))
    with pytest.raises(PatchIndexError, match="several patch sizes"):
        els.denoise(loaded, x, 0.3)
    # a file holds the uint8 images and nothing per k: the size of the class
    assert (tmp_path / "i.safetensors").stat().st_size < train.numel() + 2000
    sampled = els.sample("bbels", None, scales, x, index=loaded, dtype=torch.float64, disable=True)
    assert torch.equal(
        sampled, els.sample("bbels", train, scales, x, dtype=torch.float64, disable=True)
    )


def test_bad_training_images_are_named():
    with pytest.raises(PatchIndexError, match=r"\[-1, 1\].*pass the 8-bit images as uint8"):
        els.PatchIndex.build(random_8bit_images(2, 1, 6, 6).float(), "bbels", 3)
    bad = random_images(2, 1, 6, 6)
    bad[0, 0, 1, 1] = float("nan")
    with pytest.raises(PatchIndexError, match="NaN or infinite"):
        els.PatchIndex.build(bad, "bbels", 3)
    with pytest.raises(PatchIndexError, match="empty"):
        els.PatchIndex.build(torch.zeros(0, 1, 6, 6, dtype=torch.uint8), "bbels", 3)
    with pytest.raises(PatchIndexError, match=r"\[N, C, H, W\]"):
        els.PatchIndex.build(torch.zeros(6, 6, dtype=torch.uint8), "bbels", 3)
