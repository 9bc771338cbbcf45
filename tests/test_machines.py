"""Every machine against the loop implementation of the spec (tests/reference.py), float64."""

import itertools

import pytest
import torch
from reference import random_8bit_images, random_images, ref_denoise, ref_sample, ref_score

import els
from els.index import to_float

RTOL = 1e-10  # float64 against the float64 loop
PUBLISHED_KS = sorted({3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27})


def assert_close(actual, expected, rtol=RTOL):
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


# (H, W, C, N): square and non-square, grey and colour
SHAPES = [(7, 7, 1, 4), (8, 10, 3, 3)]
TIMES = [0.05, 0.5, 0.95]


@pytest.mark.parametrize("H,W,C,N", SHAPES)
@pytest.mark.parametrize("t", TIMES)
def test_ideal_matches_loop(H, W, C, N, t):
    train = random_images(N, C, H, W, seed=1)
    x = random_images(2, C, H, W, seed=2)
    assert_close(els.score("ideal", x, t, train), ref_score("ideal", x, t, train))


@pytest.mark.parametrize("kind", ["ls", "els", "bbels"])
@pytest.mark.parametrize("H,W,C,N", SHAPES)
@pytest.mark.parametrize("k", [3, 5, 7, 9, 11])
@pytest.mark.parametrize("t", TIMES)
def test_local_machines_match_loop(kind, H, W, C, N, k, t):
    train = random_images(N, C, H, W, seed=1)
    x = random_images(2, C, H, W, seed=2)
    if kind == "els" and (k > H or k > W):
        with pytest.raises(els.PatchIndexError, match="larger than"):
            els.score(kind, x, t, train, k)
        return
    assert_close(els.score(kind, x, t, train, k), ref_score(kind, x, t, train, k))


@pytest.mark.parametrize("kind", ["ls", "bbels"])
@pytest.mark.parametrize("k", PUBLISHED_KS)
def test_every_published_k_on_a_small_image(kind, k):
    # k from 3 to 27 on 6x6 images: interior, border, and k >= image size all happen
    train = random_images(3, 2, 6, 6, seed=3)
    x = random_images(1, 2, 6, 6, seed=4)
    assert_close(els.score(kind, x, 0.3, train, k), ref_score(kind, x, 0.3, train, k))


@pytest.mark.parametrize("k", [k for k in PUBLISHED_KS if k <= 15])
def test_els_every_k_that_fits(k):
    train = random_images(2, 1, 15, 15, seed=5)
    x = random_images(1, 1, 15, 15, seed=6)
    assert_close(els.score("els", x, 0.4, train, k), ref_score("els", x, 0.4, train, k))


@pytest.mark.parametrize(
    "kind,k", [("ideal", None), ("ls", 3), ("els", 3), ("bbels", 3), ("bbels", 5)]
)
def test_8bit_training_set_matches_loop(kind, k):
    train8 = random_8bit_images(5, 1, 8, 8, seed=7)
    train = to_float(train8, torch.float64)
    x = random_images(2, 1, 8, 8, seed=8)
    index = els.PatchIndex.build(train8, kind, k)
    for t in (0.1, 0.7):
        got = els.score(kind, x, t, index=index)
        assert_close(got, ref_score(kind, x, t, train, k))


def triton_on_cpu(monkeypatch, image_chunk=2):
    """Run the GPU's Triton kernel on the CPU, in Triton's interpreter (conftest.py chooses it), with
    chunks of `image_chunk` training images so that tiny training sets merge several chunks."""
    from els import triton_kernel

    monkeypatch.setattr(els.kernel, "kernel_for", lambda device: triton_kernel.patch_softmax)
    monkeypatch.setattr(triton_kernel, "IMAGE_CHUNK", image_chunk)


# every enumeration of the Triton kernel: centres of R (els, bbELS interior), displacements of D
# (ls, bbELS border lines and corners; bbELS with k >= the image size is all corner)
TRITON_CASES = [("ls", 3), ("els", 3), ("bbels", 3), ("bbels", 5), ("bbels", 7)]


@pytest.mark.parametrize("kind,k", TRITON_CASES)
def test_triton_kernel_matches_loop_and_cpu_kernel(monkeypatch, kind, k):
    """float64 against the loop (1e-10), the dominant candidates equal to the C++ kernel's (a training
    set with repeated images: ties must break alike); at k = 3 float32 close to the C++ kernel's
    float32 and n_eff alone equal to n_eff beside the sources."""
    train = random_8bit_images(4, 2, 7, 6, seed=9)
    train[3] = train[1]  # equal logits: the first of them is the dominant candidate
    x = random_images(2, 2, 7, 6, seed=10)
    idx = els.PatchIndex.build(train, kind, k)
    _, cpu_prov = els.denoise(idx, x, 0.2, return_provenance=True)
    cpu32 = els.denoise(idx, x.float(), 0.6)
    triton_on_cpu(monkeypatch)
    got, prov = els.denoise(idx, x, 0.2, return_provenance=True)
    assert_close(got, ref_denoise(kind, x, 0.2, to_float(train, torch.float64), k))
    for f in ("image", "row", "col"):
        assert torch.equal(getattr(prov, f), getattr(cpu_prov, f)), (kind, f)
    assert_close(prov.weight, cpu_prov.weight, rtol=1e-12)
    assert_close(prov.n_eff, cpu_prov.n_eff, rtol=1e-12)
    if (
        k == 3
    ):  # both enumerations: float32 (IEEE tl.dot where the candidates are shared), n_eff alone
        assert_close(els.denoise(idx, x.float(), 0.6).double(), cpu32.double(), rtol=2e-5)
        light = els.denoise(idx, x, 0.2, return_provenance=True, provenance_sources=False)[1]
        assert torch.equal(light.n_eff, prov.n_eff) and light.image is None


@pytest.mark.parametrize("kind,k", [("els", 3), ("bbels", 3)])
def test_triton_float32_batch_is_bit_identical_to_single_images(monkeypatch, kind, k):
    triton_on_cpu(monkeypatch)
    train = random_8bit_images(4, 1, 7, 7, seed=40)
    x = random_images(3, 1, 7, 7, seed=41).float()
    idx = els.PatchIndex.build(train, kind, k)
    together = els.denoise(idx, x, 0.3, return_provenance=True)
    alone = [els.denoise(idx, x[i : i + 1], 0.3, return_provenance=True) for i in range(3)]
    assert torch.equal(together[0], torch.cat([a[0] for a in alone]))
    for f in ("image", "row", "col", "weight", "n_eff"):
        assert torch.equal(getattr(together[1], f), torch.cat([getattr(a[1], f) for a in alone]))


def test_triton_kernel_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    from triton import knobs

    from els import triton_kernel

    monkeypatch.setattr(knobs.runtime, "interpret", False)
    idx = els.PatchIndex.build(random_8bit_images(2, 1, 7, 7), "ls", 3)
    monkeypatch.setattr(els.kernel, "kernel_for", lambda device: triton_kernel.patch_softmax)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        els.denoise(idx, random_images(1, 1, 7, 7), 0.5)


def test_a_cpu_without_a_compiler_gets_an_error_that_says_what_to_install(monkeypatch):
    def no_compiler():
        raise OSError("g++: not found")

    monkeypatch.setattr(els.kernel, "_state", {})
    monkeypatch.setattr(els.kernel, "_load", no_compiler)
    idx = els.PatchIndex.build(random_8bit_images(2, 1, 7, 7), "ls", 3)
    for _ in range(2):  # the failure is kept, not retried
        with pytest.raises(
            RuntimeError, match=r"could not be compiled \(OSError: g\+\+: not found.*C\+\+ compiler"
        ):
            els.denoise(idx, random_images(1, 1, 7, 7), 0.5)


def test_kernel_result_does_not_depend_on_the_thread_count():
    train = random_8bit_images(200, 1, 12, 12, seed=13)  # several chunks of training images
    x = random_images(2, 1, 12, 12, seed=14).float()
    idx = els.PatchIndex.build(train, "bbels", 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = els.denoise(idx, x, 0.3, return_provenance=True)
        torch.set_num_threads(max(2, threads))
        many = els.denoise(idx, x, 0.3, return_provenance=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    for f in ("image", "row", "col", "weight", "n_eff"):
        assert torch.equal(getattr(one[1], f), getattr(many[1], f))


@pytest.mark.parametrize("kind,k", [("ls", 3), ("els", 3), ("bbels", 3), ("bbels", 7)])
def test_training_set_with_a_constant_pixel_matches_loop(kind, k):
    """Real 32x32 classes have pixels that are 0 in every image (FashionMNIST class 7: 61)."""
    train = random_images(4, 2, 8, 9, seed=15)
    train[:, :, 0, :] = -1.0  # a whole constant row, at the border
    train[:, 0, 4, 4] = 0.5  # and one constant interior pixel in one channel
    x = random_images(2, 2, 8, 9, seed=16)
    for t in (0.05, 0.5):
        assert_close(els.score(kind, x, t, train, k), ref_score(kind, x, t, train, k))


@pytest.mark.parametrize("kind,k", [("ideal", None), ("ls", 3), ("els", 3), ("bbels", 3)])
def test_sampler_matches_loop_end_to_end(kind, k):
    train = random_images(4, 1, 7, 7, seed=11)
    noise = torch.randn(
        2, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(12)
    )
    scales = [3, 3, 5, 3] if kind != "ideal" else [3, 3, 3, 3]
    got = els.sample(kind, train, scales, noise, dtype=torch.float64, disable=True)
    assert_close(got, ref_sample(kind, train, scales, noise))


def test_sampler_trajectory_records_every_step():
    train = random_images(3, 1, 7, 7, seed=13)
    noise = torch.randn(1, 1, 7, 7, dtype=torch.float64)
    scales = [3, 3, 5, 7]
    final, traj = els.sample(
        "bbels", train, scales, noise, dtype=torch.float64, return_trajectory=True, disable=True
    )
    assert traj.t == [3 / 4, 2 / 4, 1 / 4]
    assert traj.k == [7, 5, 3]
    assert len(traj.x) == len(traj.denoised) == 3
    assert torch.equal(traj.x[-1], final)
    # the last step lands on t = 0: the sample is the last denoised image
    assert_close(final, traj.denoised[-1], rtol=1e-12)


# ------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("k", [3, 5])
def test_els_is_exactly_equivariant_to_circular_shifts(k):
    train = random_images(4, 2, 8, 8, seed=14)
    x = random_images(1, 2, 8, 8, seed=15)
    s = els.score("els", x, 0.5, train, k)
    for shift in [(1, 0), (0, 3), (2, 5)]:
        shifted = els.score("els", torch.roll(x, shift, dims=(2, 3)), 0.5, train, k)
        torch.testing.assert_close(
            shifted, torch.roll(s, shift, dims=(2, 3)), rtol=1e-12, atol=1e-9
        )


def test_ls_with_huge_patches_is_the_ideal_score():
    train = random_images(5, 1, 6, 6, seed=16)
    x = random_images(2, 1, 6, 6, seed=17)
    ideal = els.score("ideal", x, 0.5, train)
    for k in (11, 13):  # k >= 2H - 1: every patch covers the whole image
        assert_close(els.score("ls", x, 0.5, train, k), ideal, rtol=1e-10)


def test_ideal_returns_the_nearest_training_image_at_small_t():
    train = random_images(5, 1, 8, 8, seed=18)
    t = 0.01
    a = els.schedule.signal_scale(t)
    x = a * train[3:4] + 0.001 * random_images(1, 1, 8, 8, seed=19)
    m = els.denoise(els.PatchIndex.build(train, "ideal"), x, t)
    torch.testing.assert_close(m, train[3:4], rtol=0, atol=1e-9)


def test_bbels_equals_els_at_interior_pixels():
    # same candidates, same queries: equal up to float64 rounding (chunking differs between the two)
    train = random_images(4, 3, 9, 9, seed=20)
    x = random_images(2, 3, 9, 9, seed=21)
    for k in (3, 5):
        d = k // 2
        a = els.score("els", x, 0.4, train, k)[..., d : 9 - d, d : 9 - d]
        b = els.score("bbels", x, 0.4, train, k)[..., d : 9 - d, d : 9 - d]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bbels_with_k_at_least_image_size_is_ls():
    train = random_images(4, 1, 7, 7, seed=22)
    x = random_images(1, 1, 7, 7, seed=23)
    for k in (7, 9):
        torch.testing.assert_close(
            els.score("bbels", x, 0.5, train, k), els.score("ls", x, 0.5, train, k)
        )


def test_batch_shares_work_and_equals_single_queries():
    train = random_images(4, 1, 8, 8, seed=24)
    x = random_images(3, 1, 8, 8, seed=25)
    idx = els.PatchIndex.build(train, "bbels", 3)
    together = els.denoise(idx, x, 0.3)
    alone = torch.cat([els.denoise(idx, x[i : i + 1], 0.3) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,k", [("ideal", None), ("ls", 5), ("els", 3), ("bbels", 5)])
@pytest.mark.parametrize("C", [1, 3])
def test_float32_batch_is_bit_identical_to_single_images(kind, k, C):
    """Batching seeds may not change a seed's float32 result at all: each query image's arithmetic
    is its own (the kernel's work items never mix images)."""
    train = random_8bit_images(40, C, 12, 12, seed=40)
    x = random_images(5, C, 12, 12, seed=41).float()
    idx = els.PatchIndex.build(train, kind, k)
    for t in (0.05, 0.5, 0.95):
        together = els.denoise(idx, x, t, return_provenance=True)
        alone = [els.denoise(idx, x[i : i + 1], t, return_provenance=True) for i in range(5)]
        assert torch.equal(together[0], torch.cat([a[0] for a in alone])), (kind, C, t)
        for f in ("image", "row", "col", "weight", "n_eff"):
            single = torch.cat([getattr(a[1], f) for a in alone])
            assert torch.equal(getattr(together[1], f), single), (kind, f)


# ------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.01, 0.5, 0.99])
def test_finite_on_degenerate_inputs(dtype, t):
    constant = torch.full((3, 1, 8, 8), 0.25)
    duplicated = random_images(2, 1, 8, 8, seed=26).repeat(3, 1, 1, 1)
    far_query = torch.full((1, 1, 8, 8), 50.0, dtype=dtype)
    for train, x in itertools.product([constant, duplicated], [far_query, -far_query]):
        for kind, k in [("ideal", None), ("ls", 3), ("els", 5), ("bbels", 3)]:
            s = els.score(kind, x, t, train.to(dtype), k)
            assert torch.isfinite(s).all(), (kind, t, dtype)


def test_float32_default_close_to_float64():
    train = random_images(6, 1, 10, 10, seed=27)
    x = random_images(2, 1, 10, 10, seed=28)
    s64 = els.score("bbels", x, 0.3, train, 5)
    s32 = els.score("bbels", x.float(), 0.3, train.float(), 5)
    assert s32.dtype == torch.float32
    assert_close(s32.double(), s64, rtol=1e-4)


def test_bad_inputs_are_named():
    train = random_images(2, 1, 8, 8)
    x = random_images(1, 1, 8, 8)
    with pytest.raises(els.PatchIndexError, match="unknown machine 'foo'"):
        els.score("foo", x, 0.5, train, 3)
    for k in (4, 0, -3):
        with pytest.raises(els.PatchIndexError, match=f"k={k}"):
            els.score("bbels", x, 0.5, train, k)
    with pytest.raises(ValueError, match="outside"):
        els.score("ls", x, 1.0, train, 3)
    with pytest.raises(ValueError, match="image shape"):
        els.score("ls", random_images(1, 1, 9, 9), 0.5, train, 3)
    nan = x.clone()
    nan[0, 0, 2, 2] = float("nan")
    for kind in ("ideal", "els"):
        with pytest.raises(ValueError, match="NaN or infinite"):
            els.score(kind, nan, 0.5, train, 3)
    with pytest.raises(els.PatchIndexError, match=r"\[-1, 1\]"):
        els.score("bbels", x, 0.5, random_8bit_images(2, 1, 8, 8).float(), 3)
    with pytest.raises(ValueError, match="float32 or float64"):
        els.score("bbels", x.half(), 0.5, train, 3)


def test_ieee_float32_sets_and_restores_the_gpu_precision_flag():
    from els.machines import ieee_float32

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with ieee_float32("cuda"):  # only flags: runs without a GPU
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
        with ieee_float32("cpu"):  # nothing changes on a CPU
            assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
