"""els.cnn: models, training (determinism, resume), sampling through the machines' reverse process,
calibration on a case with a known answer, and the r / r^2 evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_workflow import SNAKEFILE, run_snakemake, write_config
from torch import nn

import els
from els.cnn import (
    Calibration,
    CnnTrajectory,
    ModelConfig,
    TrainConfig,
    build_model,
    calibrate,
    load_model,
    pearson_r,
    plot_r2_scatter,
    plot_sample_grid,
    r2_table,
    receptive_field,
    sample_cnn,
    save_model,
    summarize,
    train_noise_predictor,
)
from els.cnn.evaluate import PAPER_MEDIAN_R2, paper_table, plot_schedules
from els.cnn.train import (
    flatten_optimizer_state,
    noisy_batch,
    schedule_scales,
    unflatten_optimizer_state,
)
from els.schedule import noise_scale, signal_scale

PREPARED_FASHION_MNIST = Path(
    os.environ.get("ELS_PREPARED_FASHION_MNIST", "/tmp/fm/train.safetensors")
)


@pytest.fixture(autouse=True)
def _one_thread():
    # other work shares the cores; one thread also keeps float results independent of the machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> ModelConfig:
    values = dict(arch="resnet", channels=8, num_blocks=2, emb_dim=16, num_classes=3)
    values.update(overrides)
    return ModelConfig(**values)


def synthetic_images(n: int = 48, size: int = 8, seed: int = 0):
    """uint8 [n, 1, size, size] with class-dependent structure (bars, a square, a gradient)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.zeros(n, 1, size, size)
    for i, c in enumerate(labels.tolist()):
        offset = int(torch.randint(0, size, (1,), generator=g))
        if c == 0:
            img = ((xx + offset) % 4 < 2).float()
        elif c == 1:
            img = (((yy - offset % 4).abs() < 3) & ((xx - 4).abs() < 3)).float()
        else:
            img = (xx + yy + offset).float() / (3 * size)
        images[i, 0] = img
    noise = torch.rand(images.shape, generator=g) * 0.1
    return ((images * 0.9 + noise) * 255).clamp(0, 255).to(torch.uint8), labels


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["resnet", "unet"])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_model_shapes_and_padding_modes(arch, padding):
    config = tiny_config(arch=arch, padding=padding, channel_mult=(1, 2, 2), in_channels=3)
    model = build_model(config, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(c.padding_mode == padding for c in convs)
    assert not any(
        isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for m in model.modules()
    )
    x = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([0, 2])
    assert model(x, torch.tensor([0.1, 0.9]), labels).shape == x.shape
    unconditional = model(x, 0.5, None)  # None: the extra, unconditional class token
    assert torch.equal(unconditional, model(x, 0.5, torch.tensor([3, 3])))
    assert config.machine == ("bbels" if padding == "zeros" else "els")


def _roll(x, shift):
    return torch.roll(x, shifts=shift, dims=(-2, -1))


@pytest.mark.parametrize("arch,shift", [("resnet", (3, 5)), ("unet", (4, 8))])
def test_circular_padding_is_shift_equivariant(arch, shift):
    # the UNet's two stride-2 levels make it equivariant to shifts by multiples of 4 only
    model = build_model(tiny_config(arch=arch, padding="circular"), seed=1).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    y = model(x, 0.3, torch.tensor([0, 1]))
    y_shifted = model(_roll(x, shift), 0.3, torch.tensor([0, 1]))
    torch.testing.assert_close(y_shifted, _roll(y, shift), rtol=0, atol=1e-12)


def test_zero_padding_is_not_shift_equivariant():
    model = build_model(tiny_config(padding="zeros"), seed=1).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    y = model(x, 0.3, torch.tensor([0, 1]))
    diff = (model(_roll(x, (3, 5)), 0.3, torch.tensor([0, 1])) - _roll(y, (3, 5))).abs()
    assert diff.max() > 1e-3


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_resnet_receptive_field(num_blocks):
    config = tiny_config(num_blocks=num_blocks)
    model = build_model(config, seed=2).double()
    x = torch.randn(1, 1, 31, 31, dtype=torch.float64, requires_grad=True)
    model(x, 0.5, torch.tensor([1]))[0, 0, 15, 15].backward()
    rows = (x.grad[0, 0].abs() > 0).any(dim=1).nonzero()
    assert int(rows.max() - rows.min() + 1) == receptive_field(config) == 9 + 4 * (num_blocks - 1)


def test_safetensors_round_trip(tmp_path):
    model = build_model(tiny_config(arch="unet", channel_mult=(1, 2)), seed=3)
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"note": "test"})
    # safetensors: an 8-byte header length, then a JSON header; no pickle anywhere
    raw = path.read_bytes()
    assert raw[8:9] == b"{" and b"\x80\x04" not in raw[:16]
    loaded = load_model(path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x, 0.4, torch.tensor([0, 1])), loaded(x, 0.4, torch.tensor([0, 1])))


# ----------------------------------------------------------------------------- training


def test_training_noise_follows_the_schedule():
    for t in [0.0, 0.05, 0.5, 0.95, 1.0]:
        a, b = schedule_scales(torch.tensor(t, dtype=torch.float64))
        assert a.item() == pytest.approx(signal_scale(t)) and b.item() == pytest.approx(
            noise_scale(t)
        )
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    x_t, t, labels, eps = noisy_batch(x0, torch.zeros(4, dtype=torch.long), TrainConfig(), 7, 3)
    a, b = schedule_scales(t)
    torch.testing.assert_close(x_t, a[:, None, None, None] * x0 + b[:, None, None, None] * eps)
    assert torch.equal(labels, torch.zeros(4, dtype=torch.long))  # p_uncond = 0
    dropped = noisy_batch(x0, torch.zeros(4, dtype=torch.long), TrainConfig(p_uncond=1.0), 7, 3)[2]
    assert torch.equal(dropped, torch.full((4,), 3))


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_reproducible_and_resumes_exactly(tmp_path):
    images, labels = synthetic_images()
    mc = tiny_config()
    tc = TrainConfig(steps=12, batch_size=16, lr=2e-3, lr_decay=0.9, log_every=3, seed=5)
    straight = train_noise_predictor(mc, tc, images, labels, tmp_path / "a", progress=False)
    again = train_noise_predictor(
        mc, tc, images, labels, tmp_path / "b", progress=False, resume=False
    )
    interrupted = train_noise_predictor(
        mc, tc, images, labels, tmp_path / "c", progress=False, stop_after=5
    )
    assert interrupted.steps == 5 and not (tmp_path / "c" / "model.safetensors").exists()
    resumed = train_noise_predictor(mc, tc, images, labels, tmp_path / "c", progress=False)
    assert resumed.resumed_from == 5 and resumed.steps == 12
    ref = _params(straight.model)
    # byte-reproducible model files (sorted safetensors metadata, no timings in them)
    model_bytes = [(tmp_path / d / "model.safetensors").read_bytes() for d in "abc"]
    assert model_bytes[0] == model_bytes[1] == model_bytes[2]
    for other in (again, resumed):
        for name, value in _params(other.model).items():
            assert torch.equal(value, ref[name]), name
    loss_a = pd.read_csv(tmp_path / "a" / "loss.csv").set_index("step")["loss"]
    loss_c = pd.read_csv(tmp_path / "c" / "loss.csv").set_index("step")["loss"]
    assert list(loss_c.index) == [3, 5, 6, 9, 12]  # the interruption flushed a row at step 5
    assert loss_a[9] == loss_c[9] and loss_a[12] == loss_c[12]
    for name in ("model.safetensors", "checkpoint.safetensors", "loss.png"):
        assert (tmp_path / "c" / name).exists()
    torch.testing.assert_close(
        load_model(tmp_path / "c" / "model.safetensors").state_dict(), resumed.model.state_dict()
    )


def test_resume_refuses_a_changed_config(tmp_path):
    images, labels = synthetic_images()
    tc = TrainConfig(steps=4, batch_size=16, seed=1)
    train_noise_predictor(tiny_config(), tc, images, labels, tmp_path, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="lr"):
        train_noise_predictor(
            tiny_config(),
            TrainConfig(steps=4, batch_size=16, seed=1, lr=1.0),
            images,
            labels,
            tmp_path,
            progress=False,
        )
    # more steps is a legitimate change: training just goes on
    longer = TrainConfig(steps=6, batch_size=16, seed=1)
    assert (
        train_noise_predictor(tiny_config(), longer, images, labels, tmp_path, progress=False).steps
        == 6
    )


def test_optimizer_state_flattening_round_trip():
    model = build_model(tiny_config(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(2, 1, 8, 8), 0.5, torch.tensor([0, 1])).pow(2).mean().backward()
    opt.step()
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    restored = unflatten_optimizer_state(tensors, meta)
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for pid, entries in original["state"].items():
        for key, value in entries.items():
            assert torch.equal(restored["state"][pid][key], value)


def _loss_drop(images, labels, mc, tc, out):
    train_noise_predictor(mc, tc, images, labels, out, progress=False)
    loss = pd.read_csv(Path(out) / "loss.csv")["loss"].to_numpy()
    quarter = max(1, len(loss) // 4)
    return loss[:quarter].mean(), loss[-quarter:].mean()


def test_training_loss_decreases_on_synthetic_data(tmp_path):
    images, labels = synthetic_images(n=96)
    tc = TrainConfig(steps=120, batch_size=32, lr=3e-3, log_every=5, seed=0)
    first, last = _loss_drop(images, labels, tiny_config(), tc, tmp_path)
    assert last < 0.6 * first


@pytest.mark.skipif(
    not PREPARED_FASHION_MNIST.exists(),
    reason=f"no prepared FashionMNIST at {PREPARED_FASHION_MNIST}",
)
def test_training_loss_decreases_on_real_fashion_mnist(tmp_path):
    from els.data import load_prepared

    images, labels = load_prepared(PREPARED_FASHION_MNIST, max_per_class=8)
    mc = ModelConfig(arch="resnet", channels=12, num_blocks=2, emb_dim=32, num_classes=10)
    tc = TrainConfig(steps=50, batch_size=16, lr=2e-3, log_every=5, seed=0)
    first, last = _loss_drop(images, labels, mc, tc, tmp_path)
    assert last < 0.8 * first


# ----------------------------------------------------------------------------- sampling, calibration


class MachineAsNoisePredictor(nn.Module):
    """A 'CNN' whose noise prediction is a machine's: eps = -b_t s_machine(x, t)."""

    def __init__(self, kind, train, k=None):
        super().__init__()
        self.kind, self.train_images, self.k = kind, train, k
        self.dtype_anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, labels=None):
        t = float(t)
        return -noise_scale(t) * els.score(self.kind, x, t, self.train_images, self.k)


def test_cnn_sampling_uses_the_machines_reverse_process():
    train = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    fake = MachineAsNoisePredictor("ideal", train)
    out, trajectory = sample_cnn(
        fake, noise, None, n_steps=10, return_trajectory=True, disable=True
    )
    expected = els.sample("ideal", train, [1] * 10, noise, dtype=torch.float64, disable=True)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert trajectory.t == [i / 10 for i in range(9, 0, -1)]
    assert torch.equal(trajectory.x[0], noise)
    torch.testing.assert_close(
        trajectory.score[0], els.score("ideal", noise, 0.9, train), rtol=1e-9, atol=1e-9
    )


def test_calibration_recovers_the_patch_size_of_a_machine_cnn(tmp_path):
    train = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    fake = MachineAsNoisePredictor("bbels", train, k=5)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    _, trajectory = sample_cnn(fake, noise, None, n_steps=6, return_trajectory=True, disable=True)
    result = calibrate(
        [(trajectory, train)], "bbels", [3, 5, 7], dtype=torch.float64, progress=False
    )
    assert result.scales == [5] * 6
    assert result.median.shape == (5, 3)
    assert torch.allclose(result.median[:, 1], torch.ones(5, dtype=torch.float64))
    path = tmp_path / "schedule.txt"
    result.write(path, tmp_path / "cosines.csv")
    assert els.scales.read_scales(path, expected_length=6) == [5] * 6
    table = pd.read_csv(tmp_path / "cosines.csv")
    assert len(table) == 15 and table.loc[table["chosen"], "k"].eq(5).all()


def test_calibration_takes_the_median_over_samples_and_fills_scales_0():
    # steps t = 3/4, 2/4, 1/4; k in (3, 5); three samples
    cos = torch.tensor(
        [
            [[0.9, 0.9, 0.1], [0.5, 0.5, 1.0]],  # median: 0.9 vs 0.5 -> 3 (a mean would say 5)
            [[0.2, 0.3, 0.4], [0.5, 0.6, 0.7]],  # -> 5
            [[0.7, 0.7, 0.7], [0.7, 0.7, 0.7]],  # tie -> the smaller k
        ],
        dtype=torch.float64,
    )
    result = Calibration.from_cosines([3, 5], [0.75, 0.5, 0.25], cos)
    assert result.scales == [3, 3, 5, 3]  # scales[i] at t = i / 4; scales[0] = scales[1]


def test_calibration_with_several_classes_concatenates_samples():
    train_a = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    train_b = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    trajectories = []
    for train in (train_a, train_b):
        fake = MachineAsNoisePredictor("els", train, k=3)
        _, traj = sample_cnn(
            fake,
            torch.randn(2, 1, 8, 8, dtype=torch.float64),
            None,
            n_steps=4,
            return_trajectory=True,
            disable=True,
        )
        trajectories.append((traj, train))
    result = calibrate(trajectories, "els", [3, 5], dtype=torch.float64, progress=False)
    assert result.cosines.shape == (3, 2, 4) and result.scales == [3] * 4
    with pytest.raises(els.PatchIndexError, match="larger than"):
        calibrate(trajectories, "els", [9], progress=False)
    with pytest.raises(ValueError, match="time grid"):
        calibrate([trajectories[0], (CnnTrajectory(t=[0.5]), train_a)], "els", [3])


# ----------------------------------------------------------------------------- evaluation


def test_pearson_r_matches_numpy_and_limits():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 1, 6, 6, generator=g)
    b = 0.5 * a + torch.randn(5, 1, 6, 6, generator=g)
    r = pearson_r(a, b)
    expected = [np.corrcoef(a[i].flatten().numpy(), b[i].flatten().numpy())[0, 1] for i in range(5)]
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-6)
    assert torch.allclose(pearson_r(a, a), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(pearson_r(a, 3 * a + 2), torch.ones(5, dtype=torch.float64))  # centred
    assert torch.allclose(pearson_r(a, -a), -torch.ones(5, dtype=torch.float64))
    assert torch.isnan(pearson_r(a, torch.zeros_like(a))).all()
    with pytest.raises(ValueError, match="shapes"):
        pearson_r(a, b[:2])


def test_r2_table_summary_and_figures(tmp_path):
    g = torch.Generator().manual_seed(1)
    cnn = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    machine = cnn + 0.2 * torch.randn(4, 1, 8, 8, generator=g)
    ideal = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    df = r2_table(cnn, {"els": machine, "ideal": ideal}, seeds=[0, 1, 2, 3], classes=[0, 0, 1, 1])
    assert list(df.columns) == [
        "class", "seed", "r_els", "r2_els", "R2_els", "r_ideal", "r2_ideal", "R2_ideal"
    ]  # fmt: skip
    values = df[["r_els", "r2_els", "r_ideal", "r2_ideal"]].to_numpy()
    assert np.isfinite(values).all() and (np.abs(values) <= 1).all()
    np.testing.assert_allclose(df["r2_els"], df["r_els"] ** 2)
    # R^2 = 1 - SS_res / SS_tot of the machine's image as a prediction of the CNN's, by a loop
    for i in range(4):
        ref, pred = cnn[i].flatten().double(), machine[i].flatten().double()
        ss_res = sum((a - b) ** 2 for a, b in zip(ref.tolist(), pred.tolist(), strict=True))
        ss_tot = sum((a - ref.mean().item()) ** 2 for a in ref.tolist())
        assert df["R2_els"][i] == pytest.approx(1 - ss_res / ss_tot, rel=1e-12)
    # never above r^2 (the R^2 of the best affine fit); a brightness offset lowers R^2 only
    assert (df["R2_els"] <= df["r2_els"] + 1e-12).all()
    shifted = r2_table(cnn, {"els": machine + 0.5}, seeds=[0, 1, 2, 3])
    np.testing.assert_allclose(shifted["r2_els"], df["r2_els"])
    assert (shifted["R2_els"] < df["R2_els"]).all()
    paper = paper_table(df, ["els", "ideal"], "m")
    assert list(paper["machine"][:2]) == ["ELS", "IS"] and len(paper) == 2 + len(PAPER_MEDIAN_R2)
    assert paper["median_r2"][0] == pytest.approx(df["r2_els"].median())
    plot_schedules({"a": [3] * 20, "b": list(range(3, 23))}, tmp_path / "schedules.png")
    assert (tmp_path / "schedules.png").stat().st_size > 0
    summary = summarize(df)
    assert list(summary["group"]) == ["all", "class=0", "class=1"]
    assert summary.loc[0, "r2_els"] == pytest.approx(df["r2_els"].median())
    plot_r2_scatter(df, tmp_path / "scatter.png")
    plot_sample_grid(
        {"CNN": cnn, "ELS": machine, "IS": ideal},
        tmp_path / "grid.png",
        row_labels=[f"seed {s}" for s in range(4)],
        column_notes={"ELS": [f"r²={v:.2f}" for v in df["r2_els"]]},
    )
    assert (tmp_path / "scatter.png").stat().st_size > 0 and (tmp_path / "grid.png").exists()


# ----------------------------------------------------------------------------- the pipeline stages


def _prepared_image_folder(tmp_path, per_class=6):
    """A prepared dataset (els.data format) from a synthetic two-class image folder."""
    from PIL import Image

    from els.data import prepare_dataset

    images, labels = synthetic_images(n=3 * per_class, size=32)
    folder = tmp_path / "folder"
    for i, (img, c) in enumerate(zip(images, labels.tolist(), strict=True)):
        if c == 2:
            continue
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"class{c}" / f"{i}.png")
    out = tmp_path / "prepared.safetensors"
    prepare_dataset("imagefolder", tmp_path / "raw", out, folder=folder, channels=1)
    return out


def _fake_noise(dataset, cls, seed, shape):
    # a stand-in for the pipeline's els.noise.noise_for: a function of (class, seed) only
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + int(cls)))


def test_pipeline_stages_run_the_whole_chain(tmp_path):
    from safetensors.torch import load_file

    from els.cnn import stages

    data = _prepared_image_folder(tmp_path)
    section = {
        "dataset": "imagefolder",
        "classes": [0, 1],
        "max_train_per_class": 5,
        "device": "cpu",
        "steps": 8,
        "train": {"steps": 20, "batch_size": 8, "lr": 2e-3, "log_every": 5},
        "calibration": {"patch_sizes": [3, 7], "seeds": {"start": 100, "count": 2}},
        "evaluation": {"seeds": [0, 1, 2], "grid_rows": 4},
        "models": {
            "tiny": {
                "model": {
                    "arch": "resnet",
                    "channels": 8,
                    "num_blocks": 2,
                    "emb_dim": 16,
                    "padding": "zeros",
                }
            }
        },
    }
    settings = stages.resolve_settings(section, "tiny", num_classes=2)
    assert settings.machine == "bbels" and settings.class_labels == [0, 1]
    out = tmp_path / "results"
    info = stages.stage_train(
        settings,
        data,
        out / "work",
        out / "model.safetensors",
        out / "loss.csv",
        out / "loss.png",
        progress=False,
    )
    assert info["steps"] == 20 and info["images"] == 10
    scales = stages.stage_calibrate(
        settings,
        data,
        out / "model.safetensors",
        out / "scales.txt",
        out / "calibration.csv",
        out / "calibration.png",
        noise_fn=_fake_noise,
        progress=False,
    )
    assert els.scales.read_scales(out / "scales.txt", expected_length=8) == scales
    assert set(scales) <= {3, 7}
    cnn_files, machine_files = [], []
    for cls in settings.class_labels:
        cnn_files.append(out / f"cnn_{cls}.safetensors")
        machine_files.append(out / f"machines_{cls}.safetensors")
        stages.stage_sample_cnn(
            settings, out / "model.safetensors", cls, cnn_files[-1], noise_fn=_fake_noise
        )
        stages.stage_sample_machines(
            settings, data, out / "scales.txt", cls, machine_files[-1], noise_fn=_fake_noise
        )
    saved = load_file(str(cnn_files[0]))
    assert saved["image"].shape == (3, 1, 32, 32)
    assert torch.equal(saved["noise"][1], _fake_noise("imagefolder", 0, 1, (1, 32, 32)))
    summary = stages.stage_evaluate(
        settings,
        cnn_files,
        machine_files,
        out / "r2.csv",
        out / "r2_summary.csv",
        out / "scatter.png",
        out / "grid.png",
    )
    df = pd.read_csv(out / "r2.csv")
    assert len(df) == 6 and {"r2_bbels", "r2_ideal", "r_bbels", "r_ideal"} <= set(df.columns)
    values = df[["r_bbels", "r2_bbels", "r_ideal", "r2_ideal"]].to_numpy()
    assert np.isfinite(values).all() and (np.abs(values) <= 1).all()
    assert summary["r2_bbels"] == pytest.approx(df["r2_bbels"].median())
    for name in ("loss.png", "calibration.png", "scatter.png", "grid.png", "r2_summary.csv"):
        assert (out / name).stat().st_size > 0
    # samples that do not share their noise are refused
    with pytest.raises(ValueError, match="same noise"):
        stages.stage_evaluate(
            settings,
            cnn_files,
            machine_files[::-1],
            out / "x.csv",
            out / "y.csv",
            out / "s.png",
            out / "g.png",
        )


def test_workflow_helpers_give_each_stage_only_its_keys():
    from types import SimpleNamespace

    from els.cnn.workflow import CnnRules

    section = {
        "dataset": "FashionMNIST",
        "classes": [0, 7],
        "train": {"steps": 3},
        "calibration": {"seeds": [1]},
        "evaluation": {"seeds": [0]},
        "steps": 20,
        "models": {"a": {"model": {"arch": "resnet"}}, "b": {"model": {"arch": "unet"}}},
    }
    rules = CnnRules(section)
    w = SimpleNamespace(dataset="FashionMNIST", model="b")
    train = rules.params("train")(w)
    assert "evaluation" not in train and "calibration" not in train and train["train"]
    assert list(train["models"]) == ["b"]
    assert "train" not in rules.params("sample")(w)
    assert rules.per_class("r/{dataset}/{model}/{cls}.st")(w) == [
        "r/FashionMNIST/b/0.st",
        "r/FashionMNIST/b/7.st",
    ]
    assert len(rules.targets()) == 20 and rules.gpu == 0  # 10 files per model
    assert CnnRules({**section, "conditional": False}).class_labels() == ["all"]
    assert CnnRules(None).targets() == []


WORKFLOW_ROOT = SNAKEFILE.parent
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _pipeline_includes_cnn() -> bool:
    return SNAKEFILE.exists() and "rules/cnn.smk" in SNAKEFILE.read_text()


def _fashion_mnist_source() -> str | None:
    """'raw': Debian's copy, prepared by the pipeline's data rule (CI); 'prepared': a prepared file
    (ELS_PREPARED_FASHION_MNIST) copied in; None: neither is there."""
    if (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        return "raw"
    return "prepared" if PREPARED_FASHION_MNIST.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(not _pipeline_includes_cnn(), reason="the Snakefile does not include cnn.smk")
@pytest.mark.skipif(_fashion_mnist_source() is None, reason="no FashionMNIST copy on this machine")
def test_tiny_cnn_config_runs_the_whole_chain_in_snakemake(tmp_path):
    """CI: configs/cnn_tiny.yaml through the pipeline's Snakefile on CPU (a few minutes): the chain
    runs, the calibrated schedule is valid, every r and r^2 is finite and in [-1, 1]."""
    import yaml

    from els.cnn.stages import check_outputs

    section = yaml.safe_load((WORKFLOW_ROOT / "configs" / "cnn_tiny.yaml").read_text())["cnn"]
    config = {
        # the schema wants a dataset entry; only its data preparation runs (target cnn_all)
        "datasets": {
            "FashionMNIST": {
                "classes": section["classes"],
                "seeds": [0],
                "machines": ["bbels"],
                "schedules": {"bbels": "scales/unused.txt"},
            },
        },
        "data": {
            "local_dirs": [str(DEBIAN_FASHION_MNIST)],
            "allow_download": False,
            "allow_apt": False,
            "prefer_local": True,
        },
        "cnn": section,
    }
    (tmp_path / "scales").mkdir()
    (tmp_path / "scales" / "unused.txt").write_text(" ".join(["3"] * 20) + "\n")
    write_config(tmp_path, config)
    if _fashion_mnist_source() == "prepared":
        prepared = tmp_path / "results" / "data" / "FashionMNIST" / "train.safetensors"
        prepared.parent.mkdir(parents=True)
        prepared.write_bytes(PREPARED_FASHION_MNIST.read_bytes())
        (prepared.parent / "meta.json").write_text("{}")
    run_snakemake(tmp_path, "--cores", "2", "cnn_all", profile=None, timeout=1800)
    for model in section["models"]:
        summary = check_outputs(tmp_path / "results" / "cnn" / "FashionMNIST" / model, section)
        assert len(summary["scales"]) == section["steps"]


def test_cnn_section_is_validated_at_workflow_start():
    from els.cnn.workflow import CnnRules

    good = {"dataset": "FashionMNIST", "classes": [0], "models": {"m": {"model": {}}}}
    assert CnnRules(good).resource("train", "threads") == 4
    bad = [
        ({**good, "epochs": 3}, "cnn.epochs: unknown key"),
        ({**good, "models": {"m": {"model": {"arch": "vgg"}}}}, "arch"),
        ({**good, "train": {"learning_rate": 1}}, "unknown training config keys"),
        ({**good, "calibration": {"seeds": [0]}, "evaluation": {"seeds": [0, 1]}}, "overlap"),
        ({**good, "resources": {"train": {"gpus": 1}}}, "resources"),
        ({k: v for k, v in good.items() if k != "classes"}, "classes"),
    ]
    for section, message in bad:
        with pytest.raises(ValueError, match=message):
            CnnRules(section)


def test_zoo_machines_get_a_row_each_in_the_r2_tables(tmp_path):
    """cnn.evaluation.machines: the zoo's denoisers sampled from the CNN's noise beside its machine
    and the ideal score, with r / r^2 columns and one row per machine (no CNN training: the CNN's
    samples are stood in for by the ideal score's, whose r^2 with itself is 1)."""
    from safetensors.torch import load_file, save_file

    from els.cnn import stages
    from els.cnn.workflow import validate_section

    data = _prepared_image_folder(tmp_path)
    section = {
        "dataset": "imagefolder",
        "classes": [0],
        "max_train_per_class": 5,
        "device": "cpu",
        "steps": 4,
        "evaluation": {"seeds": [0, 1], "machines": ["wiener", "scfdm", "nearest_dataset"]},
        "models": {"tiny": {"model": {"arch": "resnet", "channels": 8, "padding": "zeros"}}},
    }
    validate_section(section)
    with pytest.raises(ValueError, match="cnn.evaluation.machines"):
        validate_section({**section, "evaluation": {"machines": ["wienr"]}})
    settings = stages.resolve_settings(section, "tiny", num_classes=1)
    assert settings.compared_machines == ["bbels", "ideal", "wiener", "scfdm", "nearest_dataset"]
    els.scales.write_scales(tmp_path / "scales.txt", [3, 3, 5, 5])
    machines = tmp_path / "machines_0.safetensors"
    stages.stage_sample_machines(
        settings, data, tmp_path / "scales.txt", 0, machines, noise_fn=_fake_noise
    )
    saved = load_file(str(machines))
    assert all(saved[m].shape == (2, 1, 32, 32) for m in settings.compared_machines)
    cnn = tmp_path / "cnn_0.safetensors"
    save_file({"noise": saved["noise"], "seeds": saved["seeds"], "image": saved["ideal"]}, cnn)
    out = {n: tmp_path / n for n in ("r2.csv", "s.csv", "m.csv", "sc.png", "g.png")}
    stages.stage_evaluate(
        settings, [cnn], [machines], out["r2.csv"], out["s.csv"], out["sc.png"], out["g.png"],
        out["m.csv"],
    )  # fmt: skip
    rows = pd.read_csv(out["m.csv"])
    assert list(rows["machine"]) == settings.compared_machines
    assert rows.set_index("machine").loc["ideal", "median_r2"] == pytest.approx(1.0)
    assert set(rows["n"]) == {2}
    table = pd.read_csv(out["r2.csv"])
    assert {f"r2_{m}" for m in settings.compared_machines} <= set(table.columns)
