"""els.zoo (the five training-free denoisers of ZOO_SPEC.md) against slow float64 loop
implementations of the spec written here, plus the spec's properties, the statistics files and the
smoothing noise's batch independence."""

from __future__ import annotations

import math

import pytest
import torch

import els
from els.index import to_float
from els.zoo import ZOO_KINDS, ZooStats, ZooStatsError, smoothing_noise
from els.zoo import denoise as zoo_denoise

T_VALUES = (0.1, 0.5, 0.9)


def schedule(t):
    angle = (t / 1.008) * math.pi / 2
    return math.cos(angle), math.sin(angle)


# ----------------------------------------------------------------------------- loop references


def flat_images(train):
    return to_float(train, torch.float64).reshape(train.shape[0], -1)


def ref_mean_cov(train):
    phi = flat_images(train)
    N, n = phi.shape
    mu = torch.zeros(n, dtype=torch.float64)
    for k in range(N):
        mu += phi[k]
    mu /= N
    cov = torch.zeros(n, n, dtype=torch.float64)
    for k in range(N):
        d = phi[k] - mu
        cov += torch.outer(d, d)
    return mu, cov / (N - 1)


def ref_wiener(train, x, t):
    """mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x - a mu), by a linear solve (no eigendecomposition)."""
    a, b = schedule(t)
    mu, cov = ref_mean_cov(train)
    n = mu.numel()
    A = a * a * cov + b * b * torch.eye(n, dtype=torch.float64)
    out = []
    for q in x.reshape(x.shape[0], -1):
        out.append(mu + a * cov @ torch.linalg.solve(A, q - a * mu))
    return torch.stack(out).reshape(x.shape)


def ref_mask(train, t, threshold):
    a, b = schedule(t)
    _, cov = ref_mean_cov(train)
    n = cov.shape[0]
    A = a * a * cov + b * b * torch.eye(n, dtype=torch.float64)
    G = torch.linalg.solve(A, a * a * cov)  # a^2 Sigma and A commute: = a^2 Sigma A^-1
    M = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        flat = abs(G[i, i]) < 1e-6
        D = 1.0 if flat else G[i, i]
        for j in range(n):
            g = 1.0 if (flat and i == j) else G[i, j]
            M[i, j] = g / D
    if threshold <= 0:
        return M
    top = max(abs(M[k, ll]) for k in range(n) for ll in range(n))
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            B[i, j] = 1.0 if abs(M[i, j]) >= threshold * top else 0.0
    return B


def ref_softmax_mean(logits, values):
    top = max(logits)
    w = [math.exp(v - top) for v in logits]
    s = sum(w)
    return sum(wi * vi for wi, vi in zip(w, values, strict=True)) / s


def ref_pca_locality(train, x, t, temperature=1.0, mask_threshold=0.005):
    a, b = schedule(t)
    B = ref_mask(train, t, mask_threshold)
    phi = flat_images(train)
    N, n = phi.shape
    out = torch.zeros(x.shape[0], n, dtype=torch.float64)
    for s, q in enumerate(x.reshape(x.shape[0], -1)):
        for j in range(n):
            logits = []
            for k in range(N):
                d = sum(B[i, j] * (q[i] - a * phi[k, i]) ** 2 for i in range(n))
                logits.append(float(-d / (2 * b * b * temperature)))
            out[s, j] = ref_softmax_mean(logits, [float(phi[k, j]) for k in range(N)])
    return out.reshape(x.shape)


def ref_optimal_one(phi, q, a, b, top_k, temperature):
    dist = [float(((q - a * phi[k]) ** 2).sum()) for k in range(phi.shape[0])]
    order = sorted(range(len(dist)), key=lambda k: (dist[k], k))[:top_k]
    logits = [-dist[k] / (2 * b * b * temperature) for k in order]
    return ref_softmax_mean(logits, [phi[k] for k in order])


def ref_optimal(train, x, t, top_k=200, temperature=1.0):
    a, b = schedule(t)
    phi = flat_images(train)
    rows = [ref_optimal_one(phi, q, a, b, top_k, temperature) for q in x.reshape(x.shape[0], -1)]
    return torch.stack(rows).reshape(x.shape)


def ref_scfdm(train, x, t, keys, n_noise=10, sigma=0.1, top_k=200, temperature=1.0):
    a, b = schedule(t)
    phi = flat_images(train)
    rows = []
    for key, q in zip(keys, x.reshape(x.shape[0], -1), strict=True):
        z = smoothing_noise(key, t, n_noise, q.shape).double()
        copies = [
            ref_optimal_one(phi, q + sigma * z[r], a, b, top_k, temperature) for r in range(n_noise)
        ]
        rows.append(sum(copies) / n_noise)
    return torch.stack(rows).reshape(x.shape)


def ref_nearest(train, x):
    phi = flat_images(train)
    rows = []
    for q in x.reshape(x.shape[0], -1):
        best, best_d = 0, math.inf
        for k in range(phi.shape[0]):
            d = float(((q - phi[k]) ** 2).sum())
            if d < best_d:
                best, best_d = k, d
        rows.append(phi[best])
    return torch.stack(rows).reshape(x.shape)


# ----------------------------------------------------------------------------- data


def tiny_train(N=12, C=2, H=4, W=3, seed=0, uint8=True):
    """Random 8-bit images with one constant channel-pixel (as real 32x32 classes have)."""
    gen = torch.Generator().manual_seed(seed)
    train = torch.randint(0, 256, (N, C, H, W), generator=gen, dtype=torch.uint8)
    train[:, C - 1, 1, 2] = 77
    return train if uint8 else to_float(train, torch.float64)


def queries(train, t, B=3, seed=1):
    """x_t = a phi + b noise around training images (so the softmaxes are neither flat nor one-hot)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = schedule(t)
    clean = to_float(train[:B], torch.float64)
    return a * clean + b * torch.randn(clean.shape, generator=gen, dtype=torch.float64)


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


# ----------------------------------------------------------------------------- against the loops


@pytest.mark.parametrize("t", T_VALUES)
@pytest.mark.parametrize("uint8", [True, False])
def test_wiener_matches_loop(t, uint8):
    train = tiny_train(uint8=uint8)
    x = queries(train, t)
    got = zoo_denoise("wiener", ZooStats.build(train), x, t)
    assert got.dtype == torch.float64
    assert rel_err(got, ref_wiener(train, x, t)) <= 1e-8


@pytest.mark.parametrize("t", T_VALUES)
@pytest.mark.parametrize("threshold", [0.005, 0.0, 0.2])
def test_pca_locality_matches_loop(t, threshold):
    train = tiny_train(N=8, C=2, H=3, W=3)
    x = queries(train, t, B=2)
    got = zoo_denoise("pca_locality", ZooStats.build(train), x, t, mask_threshold=threshold)
    want = ref_pca_locality(train, x, t, mask_threshold=threshold)
    assert rel_err(got, want) <= 1e-8


def test_pca_locality_streams_chunks_like_one_softmax():
    """A memory budget of one image per chunk gives the same global softmax."""
    train = tiny_train(N=8, C=2, H=3, W=3)
    x = queries(train, 0.3, B=2)
    stats = ZooStats.build(train)
    whole = zoo_denoise("pca_locality", stats, x, 0.3, temperature=0.7)
    tiny = zoo_denoise("pca_locality", stats, x, 0.3, temperature=0.7, memory_budget=1)
    assert rel_err(tiny, whole) <= 1e-12
    assert rel_err(whole, ref_pca_locality(train, x, 0.3, temperature=0.7)) <= 1e-8


@pytest.mark.parametrize("t", T_VALUES)
@pytest.mark.parametrize("top_k,temperature", [(200, 1.0), (5, 1.0), (1, 1.0), (4, 2.5)])
def test_optimal_matches_loop(t, top_k, temperature):
    train = tiny_train()
    x = queries(train, t)
    got = zoo_denoise("optimal", ZooStats.build(train), x, t, top_k=top_k, temperature=temperature)
    assert rel_err(got, ref_optimal(train, x, t, top_k, temperature)) <= 1e-8


@pytest.mark.parametrize("t", T_VALUES)
def test_scfdm_matches_loop(t):
    train = tiny_train()
    x = queries(train, t)
    keys = ["Tiny/0/0", "Tiny/0/1", 7]
    stats = ZooStats.build(train)
    got = zoo_denoise("scfdm", stats, x, t, keys=keys, n_noise=4, sigma=0.3, top_k=5)
    want = ref_scfdm(train, x, t, keys, n_noise=4, sigma=0.3, top_k=5)
    assert rel_err(got, want) <= 1e-8


@pytest.mark.parametrize("t", T_VALUES)
def test_nearest_dataset_matches_loop_and_returns_a_training_image(t):
    train = tiny_train()
    x = queries(train, t)
    got = zoo_denoise("nearest_dataset", ZooStats.build(train), x, t)
    assert torch.equal(got, ref_nearest(train, x))
    phi = flat_images(train)
    for row in got.reshape(got.shape[0], -1):
        assert any(torch.equal(row, p) for p in phi)


# ----------------------------------------------------------------------------- properties


def test_wiener_is_the_posterior_mean_of_the_fitted_gaussian():
    """On data drawn from a known Gaussian: wiener == E[x0 | xt] under N(mu_hat, Sigma_hat), the
    empirical fit, computed independently (torch.cov, torch.linalg.solve); and the fit is close to
    the true Gaussian, so wiener is close to the true posterior mean."""
    gen = torch.Generator().manual_seed(3)
    n = 12
    L = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.2
    true_cov = L @ L.T + 0.01 * torch.eye(n, dtype=torch.float64)  # of the draws below
    true_mu = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    draws = true_mu + torch.randn(20000, n, generator=gen, dtype=torch.float64) @ L.T
    draws = draws + 0.1 * torch.randn(20000, n, generator=gen, dtype=torch.float64)
    train = draws.reshape(-1, 1, 3, 4)
    mu_hat, cov_hat = draws.mean(0), torch.cov(draws.T)
    t = 0.4
    a, b = schedule(t)
    x = torch.randn(5, 1, 3, 4, generator=gen, dtype=torch.float64)
    got = zoo_denoise("wiener", ZooStats.build(train), x, t).reshape(5, n)

    def posterior_mean(mu, cov):
        A = a * a * cov + b * b * torch.eye(n, dtype=torch.float64)
        return mu + (a * cov @ torch.linalg.solve(A, (x.reshape(5, n) - a * mu).T)).T

    assert rel_err(got, posterior_mean(mu_hat, cov_hat)) <= 1e-10
    assert rel_err(got, posterior_mean(true_mu, true_cov)) < 0.05


@pytest.mark.parametrize("t", T_VALUES)
def test_optimal_with_top_k_at_least_n_is_the_ideal_score(t):
    train = tiny_train()
    x = queries(train, t)
    ideal = els.score("ideal", x, t, train)
    for top_k in (train.shape[0], 1000):
        got = els.score("optimal", x, t, train, top_k=top_k)
        assert rel_err(got, ideal) <= 1e-8


def test_scfdm_with_sigma_zero_is_optimal():
    train = tiny_train()
    x = queries(train, 0.3)
    stats = ZooStats.build(train, gaussian=False)
    opt = zoo_denoise("optimal", stats, x, 0.3, top_k=4)
    smooth = zoo_denoise("scfdm", stats, x, 0.3, sigma=0.0, top_k=4, n_noise=3)
    assert rel_err(smooth, opt) <= 1e-12


def test_scores_are_minus_residual_over_b2_in_the_dtype_of_x():
    train = tiny_train()
    t = 0.3
    a, b = schedule(t)
    for dtype in (torch.float32, torch.float64):
        x = queries(train, t).to(dtype)
        for kind in ZOO_KINDS:
            s = els.score(kind, x, t, train)
            m = zoo_denoise(kind, ZooStats.build(train), x, t)
            assert s.dtype == dtype and m.dtype == dtype and s.shape == x.shape
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert rel_err(s, -(x - a * m) / (b * b)) <= tol


def test_float32_agrees_with_float64():
    train = tiny_train()
    x = queries(train, 0.5)
    stats = ZooStats.build(train)
    for kind in ZOO_KINDS:
        m64 = zoo_denoise(kind, stats, x, 0.5, keys=[0, 1, 2])
        m32 = zoo_denoise(kind, stats, x.float(), 0.5, keys=[0, 1, 2])
        assert m32.dtype == torch.float32
        assert rel_err(m32.double(), m64) <= 1e-4, kind


def test_bad_parameters_are_clear_errors():
    train = tiny_train()
    x = queries(train, 0.3)
    bad = [
        ("optimal", {"top_k": 0}, "top_k"),
        ("scfdm", {"top_k": 2.5}, "top_k"),
        ("optimal", {"temperature": 0.0}, "temperature"),
        ("pca_locality", {"temperature": -1.0}, "temperature"),
        ("pca_locality", {"mask_threshold": 1.0}, "mask_threshold"),
        ("pca_locality", {"mask_threshold": -0.1}, "mask_threshold"),
        ("scfdm", {"n_noise": 0}, "n_noise"),
        ("scfdm", {"sigma": -0.1}, "sigma"),
        ("wiener", {"top_k": 3}, "top_k"),
        ("nearest_dataset", {"temperature": 1.0}, "temperature"),
        ("optimal", {"topk": 3}, "topk"),
    ]
    for kind, params, name in bad:
        with pytest.raises(ValueError, match=name):
            els.score(kind, x, 0.3, train, **params)
    with pytest.raises(ValueError, match="keys"):
        els.score("scfdm", x, 0.3, train, keys=[0])
    with pytest.raises(ValueError, match="outside"):
        els.score("optimal", x, 1.0, train)
    with pytest.raises(TypeError, match="top_k"):
        els.score("ideal", x, 0.3, train, top_k=3)
    with pytest.raises(ValueError, match="PatchIndex is for the patch machines"):
        els.sample("optimal", train, [1, 1, 1], x, index=els.PatchIndex.build(train, "ideal"))


def test_scfdm_noise_is_keyed_so_batching_does_not_change_a_seed():
    train = tiny_train()
    noise = torch.randn(4, *train.shape[1:], dtype=torch.float64)
    keys = [f"Tiny/0/{s}" for s in range(4)]
    opts = dict(dtype=torch.float64, disable=True, n_noise=3, top_k=5)
    together = els.sample("scfdm", train, [1] * 6, noise, keys=keys, **opts)
    for i in range(4):
        alone = els.sample("scfdm", train, [1] * 6, noise[i : i + 1], keys=keys[i : i + 1], **opts)
        assert (alone[0] - together[i]).abs().max() <= 1e-12
    # the key does change the smoothing noise (seen in the first step's denoised image: the final
    # samples of so small a training set are copies of training images)
    first = zoo_denoise("scfdm", ZooStats.build(train), noise[:1], 5 / 6, keys=keys[:1], n_noise=3)
    other = zoo_denoise("scfdm", ZooStats.build(train), noise[:1], 5 / 6, keys=["x"], n_noise=3)
    assert (other - first).abs().max() > 1e-6


def test_sample_trajectory_callback_and_provenance():
    train = tiny_train()
    noise = torch.randn(2, *train.shape[1:])
    scales = [5, 3, 3, 1, 7]  # k ignored: 4 steps
    for kind in ZOO_KINDS:
        steps = []
        out, traj = els.sample(
            kind, train, scales, noise, return_trajectory=True, provenance=True,
            callback=steps.append, disable=True,
        )  # fmt: skip
        assert out.dtype == torch.float32 and out.shape == noise.shape
        assert len(steps) == len(traj.t) == 4
        assert traj.k == [7, 1, 3, 3]
        assert torch.equal(traj.x[-1], out)
        if kind == "wiener":
            assert traj.provenance == []  # no softmax, no dominant training image
            continue
        prov = traj.provenance[-1]
        assert prov.image.shape == (2, 4, 3) and prov.image.dtype == torch.long
        assert bool((prov.weight > 0).all() and (prov.weight <= 1 + 1e-6).all())
        assert bool((prov.n_eff >= 1 - 1e-5).all())
    final = traj.denoised[-1].reshape(2, -1)
    phi = to_float(train, torch.float32).reshape(train.shape[0], -1)
    ids = traj.provenance[-1].image[:, 0, 0]
    assert torch.equal(final, phi[ids])  # nearest_dataset: the dominant image is the output


def test_one_image_training_set():
    train = tiny_train(N=1)
    x = queries(train, 0.5, B=1)
    for kind in ZOO_KINDS:
        m = zoo_denoise(kind, ZooStats.build(train), x, 0.5)
        assert torch.allclose(m, to_float(train, torch.float64), atol=1e-12), kind


# ----------------------------------------------------------------------------- statistics files


def test_statistics_save_load_and_refuse_stale_or_corrupt(tmp_path):
    train = tiny_train()
    stats = ZooStats.build(train)
    path = tmp_path / "stats.safetensors"
    stats.save(path, {"dataset": "Tiny", "class": "0"})
    back = ZooStats.load(path, images=train)
    for name in ("images", "mean", "eigvecs", "eigvals"):
        assert torch.equal(getattr(back, name), getattr(stats, name))
    assert back.mean.dtype == torch.float64 and back.fingerprint == stats.fingerprint
    x = queries(train, 0.4)
    assert torch.equal(
        zoo_denoise("pca_locality", back, x, 0.4), zoo_denoise("pca_locality", stats, x, 0.4)
    )
    other = tiny_train(seed=5)
    with pytest.raises(ZooStatsError, match="stale"):
        ZooStats.load(path, images=other)
    with pytest.raises(ZooStatsError, match="another training set"):
        els.score("optimal", x, 0.4, other, stats=back)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped byte in the tensor data
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bytes(raw))
    with pytest.raises(ZooStatsError, match="corrupt"):
        ZooStats.load(broken)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ZooStatsError, match="not readable"):
        ZooStats.load(tmp_path / "junk.safetensors")
    with pytest.raises(ZooStatsError, match="does not exist"):
        ZooStats.load(tmp_path / "missing.safetensors")
    with pytest.raises(ZooStatsError, match="Gaussian"):
        ZooStats.build(train, gaussian=False).save(tmp_path / "x.safetensors")


def test_saved_statistics_are_byte_reproducible(tmp_path):
    train = tiny_train()
    ZooStats.build(train).save(tmp_path / "a.safetensors")
    ZooStats.build(train).save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ZOO_KINDS)
def test_cuda_matches_cpu(kind):
    train = tiny_train()
    x = queries(train, 0.4)
    stats = ZooStats.build(train)
    cpu = zoo_denoise(kind, stats, x, 0.4, keys=[0, 1, 2])
    gpu = zoo_denoise(kind, stats, x.cuda(), 0.4, keys=[0, 1, 2])
    assert gpu.device.type == "cuda"
    assert rel_err(gpu.cpu(), cpu) <= 1e-10
    gpu32 = zoo_denoise(kind, stats, x.float().cuda(), 0.4, keys=[0, 1, 2])
    assert rel_err(gpu32.cpu().double(), cpu) <= 1e-4
