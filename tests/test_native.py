"""The compiled softmax fold (els.native) against the torch fold it replaces on a CPU, and the
fallback to the torch fold where it cannot be built."""

import pytest
import torch
from reference import random_images, ref_denoise, softmax_chunk

import els
from els import native
from els.softmax import RunningSoftmax

needs_native = pytest.mark.skipif(
    native.fold_module() is None, reason="the compiled fold could not be built here"
)


def _fold_twice(use_native, monkeypatch, G, P, E, dtype, stats, padding, strided):
    monkeypatch.setenv("ELS_NATIVE", "1" if use_native else "0")
    state = RunningSoftmax.start(G, P, E, dtype, "cpu", stats)
    for i, M in enumerate((11, 7)):  # two chunks: the running max and rescaling
        g = torch.Generator().manual_seed(10 + i)
        products, bias, centres, log_mult = softmax_chunk(
            G, P, M, E, generator=g, padding=padding, dtype=dtype, scale=3.0
        )
        if strided:  # rows of a larger tensor, as a batch's image block is
            wide = torch.zeros(G, 2 * P, M, dtype=dtype)
            wide[:, P:] = products
            products = wide[:, P:]
        ids = torch.arange(100 * i, 100 * i + M)
        state.fold_products(products, bias, 0.7, centres, log_mult, ids)
    return state.result()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_compiled_fold_equals_torch_fold(monkeypatch, dtype, E, stats, padding, strided):
    args = (3, 4, E, dtype, stats, padding, strided)
    mean, st = _fold_twice(True, monkeypatch, *args)
    ref_mean, ref_st = _fold_twice(False, monkeypatch, *args)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(mean, ref_mean, rtol=tol, atol=tol)
    if stats:
        assert torch.equal(st.best_id, ref_st.best_id)
        torch.testing.assert_close(st.best_weight, ref_st.best_weight, rtol=tol, atol=tol)
        torch.testing.assert_close(st.n_eff, ref_st.n_eff, rtol=tol, atol=tol)
        assert not (st.best_id % 100 == 5).any()  # tied with candidate 2, which comes first


@needs_native
@pytest.mark.parametrize(
    "kind,k,C", [("ideal", None, 1), ("ls", 3, 3), ("els", 5, 1), ("bbels", 3, 3), ("bbels", 5, 1)]
)
def test_denoise_with_and_without_the_compiled_fold(monkeypatch, kind, k, C):
    train = random_images(5, C, 8, 7, seed=3)
    x = random_images(2, C, 8, 7, seed=4)
    index = els.PatchIndex.build(train, kind, k)
    ref = ref_denoise(kind, x, 0.3, train, k)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ELS_NATIVE", flag)
        out[flag] = els.denoise(index, x, 0.3, return_provenance=True)
        torch.testing.assert_close(out[flag][0], ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(out["1"][1].image, out["0"][1].image)
    x32 = x.float()
    monkeypatch.setenv("ELS_NATIVE", "1")
    m32 = els.denoise(index, x32, 0.3)
    torch.testing.assert_close(m32.double(), ref, rtol=0, atol=2e-5)


def test_without_a_compiler_the_torch_fold_runs_and_says_why(monkeypatch):
    def fail():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_load", fail)
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert native.fold_module() is None
    train = random_images(4, 1, 6, 6, seed=1)
    x = random_images(1, 1, 6, 6, seed=2)
    m = els.denoise(els.PatchIndex.build(train, "bbels", 3), x, 0.4)
    torch.testing.assert_close(m, ref_denoise("bbels", x, 0.4, train, 3), rtol=1e-10, atol=1e-10)


def test_builds_are_keyed_by_the_cpu(monkeypatch):
    monkeypatch.setattr(native, "_cpu_flags", lambda: "sse2 avx2")
    avx2 = native._build_dir()
    monkeypatch.setattr(native, "_cpu_flags", lambda: "sse2 avx2 avx512f")
    assert native._build_dir() != avx2
    monkeypatch.setenv("ELS_NATIVE_DIR", "/somewhere/else")
    assert str(native._build_dir()).startswith("/somewhere/else/softmax_fold_")


def test_els_native_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("ELS_NATIVE", "0")
    assert native.fold_module() is None
    assert not native.usable(torch.zeros(1), 1)
