"""Training a noise predictor eps_theta(x_t, t, class) with the legacy cosine schedule of ELS_SPEC.md:
x_t = a_t x_0 + b_t eps, loss = mean (eps_theta(x_t, t, class) - eps)^2, t ~ U(t_min, t_max), AdamW with
an exponential learning-rate decay per epoch.

Reproducible and resumable by construction: the data order of epoch e and the (t, noise, label-drop)
draws of step s come from generators seeded by (seed, e) and (seed, s) only, and the learning rate is a
function of the epoch, so a run resumed from a checkpoint at step s (weights + AdamW state) continues
exactly as the uninterrupted run would (same device and thread count).

Files in the output directory: checkpoint.safetensors (resume state: weights, flattened AdamW state,
configs, step), model.safetensors (the final weights, see models.save_model), loss.csv, loss.png.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..index import to_float
from ..io import ContentHasher, content_sha256, write_safetensors, write_with
from .models import (
    ModelConfig,
    NoisePredictor,
    build_model,
    parameter_count,
    read_metadata,
    save_model,
)

CHECKPOINT_FORMAT = "els-cnn-checkpoint-1"
CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "model.safetensors"
LOSS_CSV_NAME = "loss.csv"
LOSS_PLOT_NAME = "loss.png"
LOSS_COLUMNS = ["step", "epoch", "lr", "loss", "seconds"]
# config keys that may change between a checkpoint and its resumption without changing the result
RESUMABLE_CHANGES = {"epochs", "steps", "checkpoint_every", "log_every"}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. The run lasts `steps` optimizer steps when given, else `epochs` epochs of
    ceil(N / batch_size) steps. The learning rate in epoch e is lr * lr_decay**e. p_uncond: probability
    to replace a label by the unconditional token (0: a purely class-conditional model)."""

    epochs: int = 10
    steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-4
    lr_decay: float = 0.98
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    p_uncond: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.batch_size < 1 or self.epochs < 0 or (self.steps is not None and self.steps < 0):
            raise ValueError(f"batch_size >= 1, epochs >= 0, steps >= 0 needed: {self}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def total_steps(self, n_images: int) -> int:
        return (
            self.steps if self.steps is not None else self.epochs * steps_per_epoch(self, n_images)
        )


def steps_per_epoch(config: TrainConfig, n_images: int) -> int:
    return max(1, math.ceil(n_images / config.batch_size))


# ----------------------------------------------------------------------------- noise and randomness


def schedule_scales(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, b_t) of the legacy cosine schedule for a tensor of times (els.schedule, vectorised)."""
    angle = (t / 1.008) * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)


def _generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, stream, index): no state to save for resumption."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def epoch_order(seed: int, epoch: int, n_images: int) -> torch.Tensor:
    return torch.randperm(n_images, generator=_generator(seed, "epoch", epoch))


def noisy_batch(
    x0: torch.Tensor, labels: torch.Tensor | None, config: TrainConfig, step: int, num_classes: int
):
    """(x_t, t, labels or None, eps) for one step; draws on the CPU so they are device-independent."""
    gen = _generator(config.seed, "step", step)
    B = x0.shape[0]
    t = config.t_min + (config.t_max - config.t_min) * torch.rand(B, generator=gen)
    eps = torch.randn(tuple(x0.shape), generator=gen)
    drop = torch.rand(B, generator=gen) < config.p_uncond
    t, eps = t.to(x0.device, x0.dtype), eps.to(x0.device, x0.dtype)
    a, b = schedule_scales(t)
    x_t = a[:, None, None, None] * x0 + b[:, None, None, None] * eps
    if labels is not None:
        labels = torch.where(drop.to(labels.device), num_classes, labels)
    return x_t, t, labels, eps


# ----------------------------------------------------------------------------- checkpoints


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], str]:
    """An optimizer state_dict as safetensors tensors + JSON (param groups, non-tensor entries)."""
    tensors, scalars = {}, {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{param_id}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}/{key}"] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "scalars": scalars})


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta_json: str) -> dict:
    meta = json.loads(meta_json)
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split("/", 2)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in meta["scalars"].items():
        param_id, key = name.split("/", 1)
        state.setdefault(int(param_id), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """sha256 of the images' content hash (els.io.content_sha256) followed by the labels' int64
    bytes: a checkpoint resumes only on the data it was trained on."""
    h = ContentHasher().text(content_sha256(images))
    if labels is not None:
        h.tensor(labels.to(torch.int64), describe=False)
    return h.hexdigest()


def save_checkpoint(
    path: Path, model: NoisePredictor, optimizer: torch.optim.Optimizer, meta: dict[str, str]
) -> None:
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta = {"format": CHECKPOINT_FORMAT, "optimizer": opt_meta, **meta}
    write_safetensors(path, tensors, meta)


def load_checkpoint(
    path: Path, model: NoisePredictor, optimizer: torch.optim.Optimizer
) -> dict[str, str]:
    """Load weights and optimizer state in place; return the checkpoint's metadata."""
    meta = read_metadata(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an ELS CNN checkpoint (format {meta.get('format')!r})")
    tensors = load_file(str(path))
    weights = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(weights, strict=True)
    opt = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
    optimizer.load_state_dict(unflatten_optimizer_state(opt, meta["optimizer"]))
    return meta


def _check_resumable(
    meta: dict[str, str],
    model_config: ModelConfig,
    config: TrainConfig,
    fingerprint: str,
    path: Path,
) -> None:
    if meta["model_config"] != model_config.to_json():
        raise ValueError(
            f"{path}: saved with model config {meta['model_config']}, "
            f"now {model_config.to_json()}; delete it to start over"
        )
    saved, now = json.loads(meta["train_config"]), json.loads(_config_json(config))
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES
    )
    if changed:
        raise ValueError(f"{path}: training config changed in {changed}; delete it to start over")
    if meta["data_fingerprint"] != fingerprint:
        raise ValueError(f"{path}: saved for other training images; delete it to start over")


def _config_json(config: TrainConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


# ----------------------------------------------------------------------------- loss log


def _trim_loss_log(path: Path, max_step: int) -> None:
    """Keep the rows up to the checkpoint's step (later ones were written by the interrupted run)."""
    rows = []
    if path.exists():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= max_step]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, LOSS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_with(path, write)


def plot_loss(csv_path: str | Path, png_path: str | Path, title: str = "training loss") -> None:
    """Loss against step (log scale) with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(df):
        ax.plot(df["step"], df["loss"], lw=0.6, alpha=0.5, label="logged mean")
        window = max(1, len(df) // 20)
        ax.plot(
            df["step"],
            df["loss"].rolling(window, min_periods=1).mean(),
            lw=1.5,
            label=f"moving average ({window})",
        )
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("epsilon MSE")
    ax.set_title(title)
    fig.tight_layout()
    try:
        write_with(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    model: NoisePredictor
    steps: int
    resumed_from: int
    seconds: float
    final_loss: float
    parameters: int


def train_noise_predictor(
    model_config: ModelConfig,
    config: TrainConfig,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    resume: bool = True,
    progress: bool | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or resume training) a noise predictor on images [N, C, H, W] (uint8 or [-1, 1] float)
    with class labels [N] (ignored when model_config.num_classes == 0). Writes the files listed in the
    module docstring to out_dir. stop_after: stop (with a checkpoint) after that many total steps, as
    an interruption would; used by tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    conditional = model_config.num_classes > 0
    if conditional and labels is None:
        raise ValueError("a class-conditional model (num_classes > 0) needs labels")
    if conditional and labels is not None and int(labels.max()) >= model_config.num_classes:
        raise ValueError(f"label {int(labels.max())} >= num_classes {model_config.num_classes}")
    labels = labels if conditional else None
    fingerprint = data_fingerprint(images, labels)

    model = build_model(model_config, seed=config.seed).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    checkpoint, loss_csv = out / CHECKPOINT_NAME, out / LOSS_CSV_NAME
    start, seconds = 0, 0.0
    if resume and checkpoint.exists():
        meta = load_checkpoint(checkpoint, model, optimizer)
        _check_resumable(meta, model_config, config, fingerprint, checkpoint)
        start, seconds = int(meta["step"]), float(meta["seconds"])
    _trim_loss_log(loss_csv, start)

    x_all = to_float(images, torch.float32).to(device)
    y_all = labels.to(device=device, dtype=torch.long) if labels is not None else None
    n = x_all.shape[0]
    per_epoch = steps_per_epoch(config, n)
    total = config.total_steps(n)
    end = total if stop_after is None else min(total, stop_after)

    def checkpoint_meta(step: int, elapsed: float) -> dict[str, str]:
        return {
            "model_config": model_config.to_json(),
            "train_config": _config_json(config),
            "data_fingerprint": fingerprint,
            "step": str(step),
            "seconds": f"{elapsed:.3f}",
        }

    model.train()
    order_epoch, order = -1, None
    interval_losses: list[float] = []
    last_loss = float("nan")
    t0 = time.perf_counter() - seconds
    bar = tqdm(total=total, initial=start, desc="train", disable=progress is False)
    with loss_csv.open("a", newline="") as log_file:
        log = csv.writer(log_file)
        for step in range(start, end):
            epoch, position = divmod(step, per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(config.seed, epoch, n).to(device)
            batch = order[position * config.batch_size : (position + 1) * config.batch_size]
            lr = config.lr * config.lr_decay**epoch
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_t, t, y, eps = noisy_batch(
                x_all[batch],
                y_all[batch] if y_all is not None else None,
                config,
                step,
                model_config.num_classes,
            )
            loss = torch.mean((model(x_t, t, y) - eps) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            interval_losses.append(loss.item())
            done = step + 1
            at_checkpoint = done % config.checkpoint_every == 0 or done == end
            if done % config.log_every == 0 or at_checkpoint:
                last_loss = sum(interval_losses) / len(interval_losses)
                log.writerow(
                    [
                        done,
                        epoch,
                        f"{lr:.6g}",
                        f"{last_loss:.6g}",
                        f"{time.perf_counter() - t0:.2f}",
                    ]
                )
                log_file.flush()
                interval_losses = []
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            if at_checkpoint:
                save_checkpoint(
                    checkpoint, model, optimizer, checkpoint_meta(done, time.perf_counter() - t0)
                )
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    if end == total:
        save_model(
            out / MODEL_NAME,
            model,
            {
                "train_config": _config_json(config),
                "data_fingerprint": fingerprint,
                "image_shape": json.dumps(list(images.shape[1:])),
                "steps": str(total),
            },
        )
        plot_loss(
            loss_csv,
            out / LOSS_PLOT_NAME,
            f"{model_config.arch}, {model_config.padding} padding, {total} steps",
        )
    model.eval()
    return TrainResult(model, end, start, seconds, last_loss, parameter_count(model))
