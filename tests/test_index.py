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
    index = els.PatchIndex.build(train, kind, k, dedup=True)
    index.save(tmp_path / "index.safetensors")
    loaded = els.PatchIndex.load(tmp_path / "index.safetensors", machine=kind, k=k, images=train)
    assert loaded.families[0].name == index.families[0].name
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
    with pytest.raises(PatchIndexError, match="machine 'bbels' at k=3, not 'els' at k=3"):
        els.PatchIndex.load(path, machine="els", k=3)
    with pytest.raises(PatchIndexError, match="not 'bbels' at k=5"):
        els.PatchIndex.load(path, machine="bbels", k=5)
    with pytest.raises(PatchIndexError, match="another training set"):
        els.PatchIndex.load(path, machine="bbels", k=3, images=other)
    index = els.PatchIndex.load(path)
    with pytest.raises(PatchIndexError, match="not 'bbels' at k=5"):
        els.sample("bbels", None, [3, 5, 5], torch.zeros(1, 1, 8, 8), indexes={5: index})


def test_dedup_keeps_provenance_of_first_occurrence():
    train = torch.zeros(3, 1, 6, 6, dtype=torch.uint8)  # identical blank images: one unique patch
    index = els.PatchIndex.build(train, "els", 3, dedup=True)
    fam = index.families[0]
    assert fam.unique.shape[1] == 1 and fam.unique_log_mult[0, 0].exp().round() == 3 * 16
    image, row, col = index.source_of(fam, torch.zeros(1, 1, dtype=torch.long))
    assert (image.item(), row.item(), col.item()) == (0, 1, 1)
