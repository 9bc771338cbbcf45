"""Provenance (dominant candidate, its weight, effective number of candidates) against the loop."""

import pytest
import torch
from reference import random_images, ref_denoise

import els


@pytest.mark.parametrize(
    "kind,k,H,W",
    [
        ("ideal", None, 6, 6),
        ("ls", 3, 6, 6),
        ("els", 3, 7, 6),
        ("bbels", 3, 7, 7),
        ("bbels", 5, 8, 7),
    ],
)
@pytest.mark.parametrize("t", [0.1, 0.6])
def test_dominant_candidate_and_n_eff_match_loop(kind, k, H, W, t):
    train = random_images(4, 2, H, W, seed=1)
    x = random_images(2, 2, H, W, seed=2)
    m, prov = els.denoise(els.PatchIndex.build(train, kind, k), x, t, return_provenance=True)
    ref_m, weights = ref_denoise(kind, x, t, train, k, with_weights=True)
    torch.testing.assert_close(m, ref_m, rtol=1e-10, atol=1e-10)
    for b in range(2):
        for r in range(H):
            for c in range(W):
                if kind == "ideal":
                    w, sources = weights[b][0]
                else:
                    w, sources = weights[(b, r, c)]
                best = int(torch.argmax(w))
                n, rr, cc = sources[best]
                assert prov.image[b, r, c].item() == n
                if kind != "ideal":
                    assert (prov.row[b, r, c].item(), prov.col[b, r, c].item()) == (rr, cc)
                else:  # the whole image is copied: every pixel comes from its own position
                    assert (prov.row[b, r, c].item(), prov.col[b, r, c].item()) == (r, c)
                assert prov.weight[b, r, c].item() == pytest.approx(w[best].item(), rel=1e-9)
                assert prov.n_eff[b, r, c].item() == pytest.approx(
                    1 / (w**2).sum().item(), rel=1e-9
                )


def test_identical_copies_count_individually_and_the_first_is_reported():
    # two identical images: every candidate has a twin, so n_eff doubles and each copy weighs half;
    # the tie between the copies goes to the first image
    base = (random_images(1, 1, 6, 6, seed=3) * 127.5 + 127.5).round().to(torch.uint8)
    x = random_images(1, 1, 6, 6, seed=4)
    _, single = els.denoise(els.PatchIndex.build(base, "bbels", 3), x, 0.3, return_provenance=True)
    _, twice = els.denoise(
        els.PatchIndex.build(base.repeat(2, 1, 1, 1), "bbels", 3), x, 0.3, return_provenance=True
    )
    torch.testing.assert_close(twice.weight, single.weight / 2)
    torch.testing.assert_close(twice.n_eff, single.n_eff * 2)
    assert torch.equal(twice.row, single.row) and torch.equal(twice.col, single.col)
    assert torch.equal(twice.image, torch.zeros_like(twice.image))


def test_sampler_records_provenance_per_step():
    train = random_images(3, 1, 7, 7, seed=5)
    noise = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    _, traj = els.sample(
        "bbels",
        train,
        [3, 3, 5],
        noise,
        dtype=torch.float64,
        return_trajectory=True,
        provenance=True,
        disable=True,
    )
    assert len(traj.provenance) == 2
    assert traj.provenance[-1].image.shape == (2, 7, 7)
    # n_eff at every step, the dominant candidates (the sources of the sample) at the last one
    first = traj.provenance[0]
    assert first.image is None and first.row is None and first.weight is None
    for p in traj.provenance:
        assert (p.n_eff >= 1 - 1e-9).all()


@pytest.mark.parametrize("kind,k", [("ls", 3), ("els", 3), ("bbels", 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_n_eff_alone_equals_n_eff_beside_the_sources(kind, k, dtype):
    train = random_images(40, 2, 9, 9, seed=6).to(dtype)
    x = random_images(2, 2, 9, 9, seed=7).to(dtype)
    index = els.PatchIndex.build(train, kind, k)
    m_all, full = els.denoise(index, x, 0.2, return_provenance=True)
    m, light = els.denoise(index, x, 0.2, return_provenance=True, provenance_sources=False)
    assert torch.equal(m, m_all) and torch.equal(light.n_eff, full.n_eff)
    assert light.image is None and light.row is None and light.col is None
    assert light.weight is None


@pytest.fixture(scope="module")
def fashion_class3(tmp_path_factory):
    from pathlib import Path

    from els.data import load_prepared, prepare_dataset

    local = Path("/usr/share/datasets/fashion-mnist")
    if not local.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fm") / "train.safetensors"
    prepare_dataset(
        "FashionMNIST",
        out.parent / "raw",
        out,
        local_dirs=[str(local)],
        allow_download=False,
        allow_apt=False,
    )
    images, _ = load_prepared(out, cls=3, max_per_class=60)
    return images


def test_ideal_memorises_and_bbels_makes_a_mosaic_on_real_fashion_mnist(fashion_class3, tmp_path):
    from els.figures import plot_provenance
    from els.provenance import mosaic_summary, stack_provenance

    noise = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    scales = [3, 3, 5, 7, 9, 11]
    summaries = {}
    for kind in ("ideal", "bbels"):
        x, traj = els.sample(
            kind,
            fashion_class3,
            scales,
            noise,
            return_trajectory=True,
            provenance=True,
            disable=True,
        )
        p = stack_provenance(traj.provenance)
        summaries[kind] = mosaic_summary(p["source_image"][0], p["source_weight"][0])
        png = tmp_path / f"{kind}.png"
        plot_provenance(
            png,
            x[0],
            p["source_image"][0],
            p["source_row"][0],
            p["source_col"][0],
            p["source_weight"][0],
            p["n_eff"][:, 0],
            traj.t,
            traj.k,
            fashion_class3,
        )
        assert png.stat().st_size > 10_000
    assert summaries["ideal"]["top_source_share"] == 1.0
    assert summaries["ideal"]["n_sources"] == 1
    assert summaries["bbels"]["top_source_share"] < 0.5
    assert summaries["bbels"]["n_sources"] > 5


def test_mosaic_summary_and_displacement():
    from els.provenance import displacement, mosaic_summary, top_sources

    src = torch.tensor([[1, 1], [1, 7]])
    s = mosaic_summary(src, torch.full((2, 2), 0.5))
    assert s == {"n_sources": 2, "top_source_share": 0.75, "mean_dominant_weight": 0.5}
    assert top_sources(src, 5) == [(1, 3), (7, 1)]
    dr, dc = displacement(torch.tensor([[0, 0], [1, 1]]), torch.tensor([[0, 1], [0, 1]]))
    assert dr.abs().sum() == 0 and dc.abs().sum() == 0  # copied in place


@pytest.mark.parametrize("kind,k", [("ls", 5), ("bbels", 3), ("bbels", 9), ("els", 3)])
def test_exact_ties_go_to_the_first_candidate(kind, k):
    """Images of exact zeros (every candidate ties exactly, whatever the order of the sums): the
    dominant one is image 0 at the first centre of the pixel's candidate set (row-major), as the
    loop implementation's first maximum. (Equal patches of other values can differ by rounding.)"""
    train = torch.zeros(3, 1, 9, 9, dtype=torch.float64)
    x = random_images(1, 1, 9, 9, seed=7)
    _, prov = els.denoise(els.PatchIndex.build(train, kind, k), x, 0.3, return_provenance=True)
    _, weights = ref_denoise(kind, x, 0.3, train, k, with_weights=True)
    for r in range(9):
        for c in range(9):
            w, sources = weights[(0, r, c)]
            n, rr, cc = sources[int(torch.argmax(w))]
            got = (prov.image[0, r, c], prov.row[0, r, c], prov.col[0, r, c])
            assert tuple(v.item() for v in got) == (n, rr, cc)
