"""Unit tests of the pipeline's library modules: els.noise, els.neighbours, els.io, els.figures and
els.config (batches, plans, config checks, the JSON schema)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from els import figures
from els.config import (
    ConfigError,
    SampleKey,
    batch_bounds,
    batch_name,
    check_config,
    planned_samples,
    resolve_device,
    resolve_dtype,
    seeds_of_batch,
)
from els.index import to_float
from els.io import read_json, read_sample, to_uint8, write_json, write_png, write_sample
from els.neighbours import l2_distances, nearest_overall_and_in_class, training_subset
from els.noise import noise_for, noise_key, noise_seed

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


# ----------------------------------------------------------------------------- noise


def test_noise_is_a_function_of_dataset_class_seed_only():
    a = noise_for("FashionMNIST", 3, 0, (1, 32, 32))
    assert a.dtype == torch.float32 and a.shape == (1, 32, 32)
    torch.manual_seed(123)  # global RNG state must not matter
    torch.randn(10)
    assert torch.equal(a, noise_for("FashionMNIST", "3", 0, (1, 32, 32)))
    others = [("FashionMNIST", 3, 1), ("FashionMNIST", 4, 0), ("MNIST", 3, 0), ("X", "all", 0)]
    for key in others:
        assert not torch.equal(a, noise_for(*key, (1, 32, 32)))


def test_noise_seed_is_sha256_of_the_key():
    digest = hashlib.sha256(b"CelebA/all/7").digest()
    assert noise_key("CelebA", "all", 7) == "CelebA/all/7"
    assert noise_seed("CelebA", "all", 7) == int.from_bytes(digest[:8], "big")
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big"))
    assert torch.equal(
        noise_for("CelebA", "all", 7, (3, 4, 4)), torch.randn(3, 4, 4, generator=generator)
    )


@pytest.mark.parametrize("cls,seed", [(-1, 0), ("cat", 0), (1, -2), (True, 0)])
def test_noise_rejects_bad_keys(cls, seed):
    with pytest.raises(ValueError):
        noise_key("MNIST", cls, seed)


# ----------------------------------------------------------------------------- neighbours


def _train(n=40, c=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, 6, 6), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 3
    return images, labels


def test_nearest_matches_brute_force_and_indexes_the_whole_set():
    images, labels = _train()
    sample = torch.rand(1, 6, 6) * 2 - 1
    brute = [float((to_float(im, torch.float64) - sample.double()).norm()) for im in images]
    nn, same = nearest_overall_and_in_class(sample, images, labels, None)
    assert nn.index == int(np.argmin(brute)) and nn.label == int(labels[nn.index])
    assert nn.distance == pytest.approx(min(brute), rel=1e-12)
    assert same == nn  # no class: the in-class neighbour is the overall one
    for cls in range(3):
        members = [i for i in range(len(labels)) if labels[i] == cls]
        best = min(members, key=lambda i: brute[i])
        overall, in_class = nearest_overall_and_in_class(sample, images, labels, cls)
        assert overall == nn
        assert (in_class.index, in_class.label) == (best, cls)
        assert in_class.distance == pytest.approx(brute[best], rel=1e-12)
    assert torch.allclose(
        l2_distances(sample, images, chunk=7), torch.tensor(brute, dtype=torch.float64)
    )


def test_a_training_image_is_its_own_neighbour_and_ties_go_to_the_lowest_index():
    images, labels = _train(c=3)
    images[17] = images[5]  # a duplicate: both at distance 0
    nn, _ = nearest_overall_and_in_class(to_float(images[17], torch.float32), images, labels, None)
    assert nn.index == 5 and nn.distance == pytest.approx(0.0, abs=1e-6)
    cls = int(labels[5])
    images[[i for i in range(len(labels)) if labels[i] == cls][-1]] = images[5]
    in_class = nearest_overall_and_in_class(to_float(images[5], torch.float32), images, labels, cls)
    assert in_class[1].index == 5 and in_class[0].index == 5


def test_neighbour_errors():
    images, labels = _train()
    with pytest.raises(ValueError, match="no training image has class 7"):
        nearest_overall_and_in_class(torch.zeros(1, 6, 6), images, labels, 7)
    with pytest.raises(ValueError, match="do not match"):
        nearest_overall_and_in_class(torch.zeros(3, 6, 6), images, labels, None)
    with pytest.raises(ValueError, match="2 labels for 40 images"):
        nearest_overall_and_in_class(torch.zeros(1, 6, 6), images, labels[:2], None)


def test_training_subset_is_the_first_images_of_each_class():
    labels = torch.tensor([1, 0, 1, 1, 0, 2, 1])
    assert training_subset(labels, 1, 2).tolist() == [0, 2]
    assert training_subset(labels, 1, None).tolist() == [0, 2, 3, 6]
    assert training_subset(labels, None, 1).tolist() == [0, 1, 5]


# ----------------------------------------------------------------------------- io


def test_sample_file_round_trip(tmp_path):
    noise, image = torch.randn(1, 8, 8), torch.rand(1, 8, 8) * 2 - 1
    traj = torch.randn(3, 1, 8, 8)
    meta = {"t": json.dumps([0.75, 0.5, 0.25]), "k": json.dumps([5, 5, 3]), "device": "cpu"}
    path = write_sample(
        tmp_path / "a" / "seed0.safetensors",
        noise=noise,
        image=image,
        metadata=meta,
        trajectory_x=traj,
        trajectory_denoised=traj + 1,
    )
    s = read_sample(path)
    assert torch.equal(s.noise, noise) and torch.equal(s.image, image)
    assert torch.equal(s.trajectory_denoised, traj + 1)
    assert s.t == [0.75, 0.5, 0.25] and s.k == [5, 5, 3] and s.metadata["device"] == "cpu"
    assert not list(path.parent.glob("*.tmp"))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": 1})

    class Boom:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"a": Boom()})
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_png_round_trips_8bit_images(tmp_path):
    u = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    path = write_png(tmp_path / "g.png", to_float(u, torch.float32))
    assert np.array_equal(np.asarray(Image.open(path)), u[0].numpy())
    rgb = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    assert to_uint8(rgb).shape == (4, 4, 3)
    assert np.array_equal(to_uint8(to_float(rgb, torch.float64)), rgb.permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------- figures


def _png_ok(path: Path, min_size=(100, 100)):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert np.asarray(im.convert("L")).std() > 0  # not a blank canvas


@pytest.mark.parametrize("channels", [1, 3])
def test_every_figure_kind_writes_a_png(tmp_path, channels):
    img = lambda s: torch.rand(channels, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1  # noqa: E731
    u8 = torch.randint(0, 256, (channels, 8, 8), dtype=torch.uint8)
    figures.pair_figure(
        tmp_path / "pair.png", img(0), [(u8, "in class"), (u8, "overall")], title="class 3"
    )
    figures.grid_figure(
        tmp_path / "grid.png",
        {(r, c): img(i) for i, (r, c) in enumerate([("0", "0"), ("0", "1"), ("1", "0")])},
        ["0", "1"],
        ["0", "1"],
        title="grid",
    )
    figures.comparison_figure(
        tmp_path / "cmp.png",
        [
            {"label": m, "sample": img(i), "neighbour": u8, "neighbour_title": "#1"}
            for i, m in enumerate("ab")
        ],
        title="cmp",
    )
    figures.trajectory_figure(
        tmp_path / "traj.png",
        [0.5, 0.25],
        [5, 3],
        torch.stack([img(1), img(2)]),
        torch.stack([img(3), img(4)]),
        title="traj",
        noise=img(5),
    )
    for name in ("pair", "grid", "cmp", "traj"):
        _png_ok(tmp_path / f"{name}.png")


def test_pair_figure_needs_a_neighbour_panel(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        figures.pair_figure(tmp_path / "p.png", torch.zeros(1, 4, 4), [], title="x")


def test_mosaic_regions_colour_the_top_sources_and_grey_the_rest():
    source = torch.tensor([[5, 5, 5], [5, 2, 2], [5, 9, 7]])  # 5: 5 px, 2: 2 px, 9 and 7: 1 px
    white = torch.ones(1, 3, 3)  # a white sample: the faint copy multiplies by exactly 1
    rgb, legend = figures.mosaic_regions(white, source, n_top=2)
    assert [(index, count) for index, count, _ in legend] == [(5, 5), (2, 2)]
    src = source.numpy()
    assert np.allclose(rgb[src == 5], figures.SOURCE_COLOURS[0])
    assert np.allclose(rgb[src == 2], figures.SOURCE_COLOURS[1])
    assert len({tuple(c) for _, _, c in legend}) == 2  # distinct
    rest = rgb[(src == 9) | (src == 7)]
    assert np.allclose(rest, figures.OTHER_GREY)  # grey: R = G = B
    for colour in figures.SOURCE_COLOURS:
        assert np.ptp(colour) > 0.2  # no source colour is itself a grey
    assert len(set(figures.SOURCE_COLOURS)) == len(figures.SOURCE_COLOURS)


def test_mosaic_regions_show_the_sample_faintly_through():
    source = torch.zeros(2, 2, dtype=torch.long)
    sample = torch.tensor([[[-1.0, 1.0], [1.0, 1.0]]])  # one black pixel, the rest white
    rgb, _ = figures.mosaic_regions(sample, source, n_top=1)
    colour = np.array(figures.SOURCE_COLOURS[0])
    assert np.allclose(rgb[0, 1], colour)
    assert np.allclose(rgb[0, 0], colour * (1 - figures.SAMPLE_FAINTNESS))  # darker, same hue
    with pytest.raises(ValueError, match="n_top"):
        figures.mosaic_regions(sample, source, n_top=len(figures.SOURCE_COLOURS) + 1)


def test_displacement_wheel_hue_follows_the_direction_and_saturation_the_distance():
    from matplotlib.colors import rgb_to_hsv

    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    # a source up on screen is a negative row offset: the angle is measured with rows flipped
    dr, dc = -3 * np.sin(angles), 3 * np.cos(angles)
    hsv = rgb_to_hsv(figures.displacement_rgb(dr, dc, max_distance=6.0))
    assert np.allclose(hsv[:, 0], angles / (2 * np.pi), atol=1e-6)
    assert np.allclose(hsv[:, 1], 0.5) and np.allclose(hsv[:, 2], 1.0)
    in_place = figures.displacement_rgb(np.zeros(1), np.zeros(1), max_distance=6.0)
    assert np.allclose(in_place, 1.0)  # white
    right, up = figures.displacement_rgb(np.array([0.0, -6.0]), np.array([6.0, 0.0]), 6.0)
    assert np.allclose(right, [1, 0, 0])  # hue 0: red
    assert np.allclose(rgb_to_hsv(up)[0], 0.25)  # a quarter turn counter-clockwise


def test_provenance_figure_with_fewer_sources_than_colours(tmp_path):
    source = torch.tensor([[0, 0, 1, 1]] * 4)
    rows = torch.arange(4).view(4, 1).expand(4, 4)
    cols = (torch.arange(4).view(1, 4) + torch.tensor([[0, 0, 1, 1]])).clamp(max=3)
    train = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    path = figures.plot_provenance(
        tmp_path / "prov.png",
        torch.rand(1, 4, 4) * 2 - 1,
        source,
        rows,
        cols,
        torch.full((4, 4), 0.9),
        torch.rand(3, 4, 4) * 10 + 1,
        [0.75, 0.5, 0.25],
        [5, 3, 3],
        train,
        title="two sources",
    )
    _png_ok(path, min_size=(800, 300))


def test_trajectory_figure_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="one entry per step"):
        figures.trajectory_figure(
            tmp_path / "t.png",
            [0.5],
            [3, 5],
            torch.zeros(1, 1, 4, 4),
            torch.zeros(1, 1, 4, 4),
            title="x",
        )


# ----------------------------------------------------------------------------- config


def test_batches_are_aligned_blocks():
    assert batch_bounds(5, 2) == (4, 5) and batch_name(5, 2) == "seeds4-5"
    assert batch_name(0, 1) == "seeds0-0" and batch_name(9, 10) == "seeds0-9"
    assert seeds_of_batch("seeds2-3") == [2, 3]
    for bad in ("seeds3-2", "2-3", "seeds2"):
        with pytest.raises(ConfigError):
            seeds_of_batch(bad)


SCHEDULES = {
    m: "scales/FashionMNIST_ResNet_zeros_conditional.txt" for m in ("ideal", "ls", "els", "bbels")
}


def _config(**dataset):
    ds = {
        "source": "torchvision",
        "classes": [0, 1],
        "seeds": [0, 1],
        "machines": ["bbels"],
        "schedules": dict(SCHEDULES),
        "comparison": {"classes": [1], "seeds": [0, 5], "machines": ["ideal", "bbels"]},
    }
    ds.update(dataset)
    return {"datasets": {"FashionMNIST": ds}}


def test_planned_samples_cover_grid_and_comparison_once():
    keys = planned_samples(_config())
    grid = {SampleKey("FashionMNIST", "bbels", c, s) for c in "01" for s in (0, 1)}
    comparison = {SampleKey("FashionMNIST", m, "1", s) for m in ("ideal", "bbels") for s in (0, 5)}
    assert set(keys) == grid | comparison and len(keys) == len(set(keys))
    unconditional = _config(
        conditional=False, classes=None, comparison={"seeds": [0], "machines": ["ls"]}
    )
    assert {k.cls for k in planned_samples(unconditional)} == {"all"}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"classes": [0, 10]}, "class ids \\[10\\]"),
        ({"schedules": {**SCHEDULES, "bbels": "scales/nope.txt"}}, "schedules.bbels"),
        (
            {"schedules": {"bbels": "scales/FashionMNIST_ResNet_zeros_conditional.txt"}},
            "no entry for machine 'ideal'",
        ),
        ({"channels": 3}, "channels"),
        ({"source": "imagefolder"}, "needs path"),
        ({"conditional": False}, "only used when conditional"),
    ],
)
def test_check_config_names_the_wrong_key(change, message):
    with pytest.raises(ConfigError, match=message):
        check_config(_config(**change), root=REPO)


def test_check_config_refuses_els_patch_larger_than_the_image(tmp_path):
    (tmp_path / "big.txt").write_text("3 33 33\n")
    config = _config(machines=["els"], schedules={"els": "big.txt"}, comparison=None)
    with pytest.raises(ConfigError, match="larger than the 32x32"):
        check_config(config, root=tmp_path)


def test_check_config_accepts_the_shipped_configs():
    import yaml

    for path in [REPO / "config.yaml", *sorted((REPO / "configs").glob("paper_*.yaml"))]:
        check_config(yaml.safe_load(path.read_text()), root=REPO)


def test_schema_rejects_unknown_keys_and_accepts_shipped_configs():
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    default = yaml.safe_load((REPO / "config.yaml").read_text())
    validate(copy.deepcopy(default), str(SCHEMA))
    validate(
        yaml.safe_load((REPO / "configs" / "paper_fashion_mnist.yaml").read_text()), str(SCHEMA)
    )
    for path in (["sampling", "devise"], ["datasets", "FashionMNIST", "seed"], ["typo"]):
        bad = copy.deepcopy(default)
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = 1
        with pytest.raises(WorkflowError, match=path[-1]):
            validate(bad, str(SCHEMA))


def test_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_dtype("float64") == torch.float64
    with pytest.raises(ConfigError):
        resolve_dtype("float16")
