"""The fused softmax fold for CUDA (els.fused, Triton) run by Triton's interpreter on the CPU: its
kernels against the torch fold they replace (ties, multiplicities with padding, strided chunks,
several candidate ranges and query blocks), and every machine through denoise against the loop
implementation of the spec. On a GPU, tests/test_cuda.py runs the same kernels compiled."""

import os
from types import SimpleNamespace

import pytest
import torch
from reference import random_8bit_images, random_images, ref_denoise, softmax_chunk

import els
from els import fused
from els.softmax import RunningSoftmax

interpreter = pytest.mark.skipif(
    not fused._triton_ok() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton, in interpreter mode (tests/conftest.py sets it where there is no GPU)",
)


@pytest.fixture
def interpreted(monkeypatch):
    """The fused fold taken wherever it applies on a CPU too (the kernels run interpreted)."""
    monkeypatch.setattr(
        fused,
        "usable",
        lambda t, channels: t.dtype == torch.float32 and channels <= fused.MAX_CHANNELS,
    )
    monkeypatch.setattr(fused, "SPLIT", 128)  # several candidate ranges even in tiny tests


def _chunks(G, D, E, padding, seed):
    g = torch.Generator().manual_seed(seed)
    return [  # two chunks: the running max and its rescaling
        (*softmax_chunk(G, D, M, E, generator=g, padding=padding, bias_scale=3.0), 1000 * i)
        for i, M in enumerate((300, 70))
    ]


@interpreter
@pytest.mark.parametrize("D", [9, 45])  # one slice of the patch, several
@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_fused_fold_equals_torch_fold(interpreted, D, E, stats, padding, strided):
    G, R = 2, 70  # two query blocks of 64, the second partly empty
    queries = torch.randn(G, R, D, generator=torch.Generator().manual_seed(1))
    fused_state = RunningSoftmax.start(G, R, E, torch.float32, "cpu", stats)
    torch_state = RunningSoftmax.start(G, R, E, torch.float32, "cpu", stats)
    for patches_t, bias, centres, log_mult, first in _chunks(G, D, E, padding, seed=2):
        M = bias.shape[1]
        if strided:  # views of wider tensors, as chunks of materialised candidates are
            patches_t = torch.cat([patches_t, patches_t], 2)[:, :, :M]
            centres = torch.cat([centres, centres], 2)[:, :, :M]
            if log_mult is not None:
                log_mult = torch.cat([log_mult, log_mult], 1)[:, :M]
        fused.fold_chunk(fused_state, queries, patches_t, bias, 0.7, centres, log_mult, first)
        logits = torch.baddbmm(bias.unsqueeze(1), queries, patches_t, alpha=0.7)
        torch_state.fold(logits, centres, log_mult, torch.arange(first, first + M))
    mean, st = fused_state.result()
    ref_mean, ref_st = torch_state.result()
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    if stats:
        assert torch.equal(st.best_id, ref_st.best_id)
        torch.testing.assert_close(st.best_weight, ref_st.best_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.n_eff, ref_st.n_eff, rtol=1e-5, atol=1e-6)
        assert not (st.best_id % 1000 == 5).any()  # tied with candidate 2, which comes first


@interpreter
def test_too_many_channels_is_refused():
    state = RunningSoftmax.start(1, 2, 9, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="at most 8 centre channels"):
        fused.fold_chunk(
            state,
            torch.zeros(1, 2, 3),
            torch.zeros(1, 3, 4),
            torch.zeros(1, 4),
            1.0,
            torch.zeros(1, 10, 4),
            None,
            0,
        )


@interpreter
@pytest.mark.parametrize(
    "kind,k,C,H,W",
    [
        ("ls", 3, 3, 7, 6),
        ("els", 3, 1, 7, 6),
        ("els", 7, 2, 7, 7),  # k = image size: one candidate per image
        ("bbels", 3, 3, 7, 6),
        ("bbels", 5, 1, 7, 6),
        ("bbels", 9, 1, 7, 6),  # k > image size: no interior
    ],
)
def test_denoise_through_the_fused_fold_matches_loop(interpreted, kind, k, C, H, W):
    train = random_images(5, C, H, W, seed=3)
    x = random_images(2, C, H, W, seed=4)
    index = els.PatchIndex.build(train, kind, k)
    ref = ref_denoise(kind, x, 0.3, train, k)
    m = els.denoise(index, x.float(), 0.3, prune_below_t=0)
    rel = ((m.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 2e-5


@interpreter
@pytest.mark.parametrize("kind,k", [("els", 3), ("bbels", 3), ("bbels", 5)])
def test_dedup_provenance_through_the_fused_fold(interpreted, monkeypatch, kind, k):
    train = random_8bit_images(6, 1, 9, 9, seed=5)
    x = random_images(2, 1, 9, 9, seed=6, dtype=torch.float32)
    index = els.PatchIndex.build(train, kind, k, dedup=True)
    assert any(f.unique is not None for f in index.families)
    m, prov = els.denoise(index, x, 0.1, return_provenance=True, prune_below_t=0)
    monkeypatch.setattr(fused, "usable", lambda t, channels: False)
    ref_m, ref_prov = els.denoise(index, x, 0.1, return_provenance=True, prune_below_t=0)
    torch.testing.assert_close(m, ref_m, rtol=1e-5, atol=1e-5)
    for f in ("image", "row", "col"):
        assert torch.equal(getattr(prov, f), getattr(ref_prov, f)), f
    torch.testing.assert_close(prov.weight, ref_prov.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prov.n_eff, ref_prov.n_eff, rtol=1e-4, atol=1e-5)


@interpreter
def test_kernels_that_fail_on_a_gpu_fall_back_to_the_torch_fold(interpreted, monkeypatch):
    train = random_images(4, 1, 7, 7, seed=7)
    x = random_images(2, 1, 7, 7, seed=8, dtype=torch.float32)
    index = els.PatchIndex.build(train, "bbels", 3)
    expected = els.denoise(index, x, 0.3, prune_below_t=0)

    def out_of_resources(*args, **kw):
        raise RuntimeError("out of resource: shared memory, Required: 249856")

    monkeypatch.setattr(fused, "fold_chunk", out_of_resources)
    monkeypatch.setattr(fused, "_state", {})
    with pytest.warns(RuntimeWarning, match="fused GPU softmax fold is off.*shared memory"):
        m = els.denoise(index, x, 0.3, prune_below_t=0)
    torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-5)
    assert "shared memory" in fused._state["off"]


def test_a_gpu_without_triton_uses_the_torch_fold(monkeypatch):
    gpu_like = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    monkeypatch.setattr(fused, "_state", {})
    monkeypatch.setattr(fused, "_triton_ok", lambda: True)
    assert fused.usable(gpu_like, 1)
    assert not fused.usable(gpu_like, 9)  # the ideal score's whole-image centres
    assert not fused.usable(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64), 1)
    monkeypatch.setattr(fused, "_triton_ok", lambda: False)
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        assert not fused.usable(gpu_like, 1)
    assert not fused.usable(gpu_like, 1)  # warned once


def test_off_switch_and_where_it_applies(monkeypatch):
    cuda_like = torch.empty(0, device="meta")  # neither CPU nor CUDA: never
    assert not fused.usable(cuda_like, 1)
    assert not fused.usable(torch.zeros(1), 1)  # CPUs fold with els.native or torch
    monkeypatch.setenv("ELS_FUSED", "0")
    assert not fused.enabled()
    monkeypatch.setenv("ELS_FUSED", "1")
    assert fused.enabled()
