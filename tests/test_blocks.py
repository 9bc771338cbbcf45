"""Certified pruning (els.blocks): candidate blocks with bounds, against the loop implementation."""

import math

import pytest
import torch
from reference import random_8bit_images, random_images, ref_denoise

import els
import els.blocks
from els.index import to_float
from els.schedule import noise_scale, signal_scale


@pytest.fixture
def small_leaves(monkeypatch):
    # blocks of 3 candidates: many blocks even on tiny training sets, so that pruning happens
    monkeypatch.setattr(els.blocks, "LEAF_SIZE", 3)


def noisy(train, t, seed):
    """Noised training images: queries near the data, as in a real reverse process."""
    clean = to_float(train[:2], torch.float64)
    noise = random_images(*clean.shape, seed=seed)
    return signal_scale(t) * clean + noise_scale(t) * noise


def fraction_visited(index, x, t, k):
    fam = index.families[0]
    blocks = index.candidate_blocks(fam, x.dtype, "cpu")
    padding = "circular" if index.machine == "els" else "constant"
    padded = torch.nn.functional.pad(x[:1], (k // 2,) * 4, mode=padding)
    patches = torch.nn.functional.unfold(padded, k)[0].t()
    q = patches[fam.query_pos[0]]
    a, b = signal_scale(t), noise_scale(t)
    return blocks.softmax_mean(q, a=a, b2=b * b)[2]


@pytest.mark.parametrize("kind", ["els", "bbels"])
# float images; 8-bit images gathered from the stored bytes; 8-bit deduplicated candidates
@pytest.mark.parametrize("images", ["float", "8bit", "8bit-dedup"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("C", [1, 2])
def test_pruned_softmax_matches_loop_and_dense(small_leaves, kind, images, k, C):
    eight_bit = images.startswith("8bit")
    train = random_8bit_images(6, C, 9, 8, seed=1) if eight_bit else random_images(6, C, 9, 8)
    index = els.PatchIndex.build(train, kind, k, dedup=images == "8bit-dedup")
    assert any(f.unique is not None for f in index.families) == (images == "8bit-dedup")
    assert index.block_plans, "the interior family should have a block plan"
    visited = []
    for t in (0.05, 0.2, 0.45):
        x = noisy(train, t, seed=2)
        got, prov = els.denoise(index, x, t, return_provenance=True, prune_below_t=1.0)
        dense, prov_dense = els.denoise(index, x, t, return_provenance=True, prune_below_t=0)
        ref = ref_denoise(kind, x, t, to_float(train, torch.float64), k)
        assert (got - ref).abs().max().item() < 1e-12
        assert (got - dense).abs().max().item() < 1e-12
        if images == "8bit":
            # identical stored patches tie (up to the products' rounding): an identical patch
            assert torch.equal(patches_at(train, k, prov), patches_at(train, k, prov_dense))
        else:
            for field in ("image", "row", "col"):
                assert torch.equal(getattr(prov, field), getattr(prov_dense, field)), field
        torch.testing.assert_close(prov.weight, prov_dense.weight)
        torch.testing.assert_close(prov.n_eff, prov_dense.n_eff)
        visited.append(fraction_visited(index, x, t, k))
    assert visited[0] < 0.9, f"hardly any pruning at t=0.05: visited {visited}"


def patches_at(train, k, prov):
    """The zero-padded k x k training patch each pixel's provenance names."""
    d = k // 2
    padded = torch.nn.functional.pad(to_float(train, torch.float64), (d, d, d, d))
    patches = padded.unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H, W, k, k]: centred on (r, c)
    return patches[prov.image, :, prov.row, prov.col]


def test_pruned_provenance_on_ties_reports_an_identical_patch(small_leaves):
    # two grey levels on a mostly flat background, no deduplication: many tied candidates. Both
    # paths must report, per pixel, a patch identical to the other's (the one the weight belongs to)
    train = random_8bit_images(6, 1, 9, 9, seed=4, levels=2, background=0.9)
    index = els.PatchIndex.build(train, "bbels", 3, dedup=False)
    for t in (0.05, 0.3):
        x = noisy(train, t, seed=5)
        _, prov = els.denoise(index, x, t, return_provenance=True, prune_below_t=1.0)
        _, dense = els.denoise(index, x, t, return_provenance=True, prune_below_t=0)
        torch.testing.assert_close(prov.weight, dense.weight)
        assert torch.equal(patches_at(train, 3, prov), patches_at(train, 3, dense)), t


def test_bounds_hold_for_every_candidate(small_leaves):
    train = random_8bit_images(5, 1, 10, 10, seed=3)
    index = els.PatchIndex.build(train, "bbels", 5, dedup=True)
    blocks = index.candidate_blocks(index.families[0], torch.float64, "cpu")
    q = random_images(40, 1, 5, 5, seed=4).reshape(40, 25) - 0.3 * blocks.plan.mu
    for t in (0.05, 0.5, 0.9):
        a, b = signal_scale(t), noise_scale(t)
        bounds = blocks.logit_bounds(q, a, b * b)
        starts = blocks.plan.starts.tolist()
        for j in range(len(starts) - 1):
            c = blocks.cand_t[:, starts[j] : starts[j + 1]]
            logits = q.square().sum(1, keepdim=True) - (q.unsqueeze(2) - a * c).square().sum(1)
            logits = logits / (2 * b * b) + blocks.log_mult[starts[j] : starts[j + 1]]
            assert (logits.max(1).values <= bounds[:, j] + 1e-9).all()


def test_pruned_float32_batch_is_bit_identical_to_single_images(small_leaves):
    train = random_8bit_images(8, 1, 10, 10, seed=5)
    index = els.PatchIndex.build(train, "bbels", 3)
    x = noisy(train, 0.1, seed=6).float()
    batch = els.denoise(index, x, 0.1)
    alone = torch.cat([els.denoise(index, x[i : i + 1], 0.1) for i in range(x.shape[0])])
    assert torch.equal(batch, alone)


def test_block_plan_is_saved_and_loaded(tmp_path, small_leaves):
    train = random_8bit_images(5, 1, 9, 9, seed=7)
    index = els.PatchIndex.build(train, "bbels", 3)
    index.save(tmp_path / "index.safetensors")
    loaded = els.PatchIndex.load(tmp_path / "index.safetensors", machine="bbels", k=3)
    assert loaded.block_plans.keys() == index.block_plans.keys()
    for i, plan in index.block_plans.items():
        for name, value in plan.tensors().items():
            assert torch.equal(getattr(loaded.block_plans[i], name), value), name
    x = noisy(train, 0.1, seed=8)
    assert torch.equal(els.denoise(loaded, x, 0.1), els.denoise(index, x, 0.1))


def test_no_plan_means_dense_and_a_clear_error():
    train = random_images(3, 1, 7, 7)
    index = els.PatchIndex.build(train, "bbels", 3, blocks=False)
    assert not index.block_plans
    x = noisy(train, 0.1, seed=9)
    ref = ref_denoise("bbels", x, 0.1, train, 3)
    assert (els.denoise(index, x, 0.1) - ref).abs().max().item() < 1e-12
    with pytest.raises(els.PatchIndexError, match="no block plan"):
        index.candidate_blocks(index.families[0], torch.float64, "cpu")


@pytest.mark.parametrize("native", ["0", "1"])  # the torch fold and the compiled one
def test_running_softmax_reports_the_smallest_id_among_exact_ties(monkeypatch, native):
    from els.softmax import RunningSoftmax

    monkeypatch.setenv("ELS_NATIVE", native)
    state = RunningSoftmax.start(1, 1, 1, torch.float64, "cpu", with_stats=True)

    def fold(logits, ids):  # logits of one chunk: products with alpha 1 and no bias
        M = len(logits)
        products = torch.tensor([[logits]], dtype=torch.float64)
        zeros, centres = torch.zeros(1, M, dtype=torch.float64), torch.ones(1, 2, M).double()
        state.fold_products(products, zeros, 1.0, centres, None, torch.tensor(ids))

    fold([1.0, 3.0, 3.0, 2.0], [10, 11, 12, 13])
    assert state.best_id.item() == 11  # first of the tie within a chunk
    # a later chunk (a pruned block) with a smaller id at the same logit wins; a larger one does not
    fold([3.0, 0.0], [12, 20])
    assert state.best_id.item() == 11
    fold([0.0, 3.0], [4, 6])
    assert state.best_id.item() == 6
    _, stats = state.result()
    total = math.exp(1) + 4 * math.exp(3) + math.exp(2) + 2 * math.exp(0)
    assert stats.best_weight.item() == pytest.approx(math.exp(3) / total, rel=1e-12)
