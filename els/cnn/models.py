"""Minimal class-conditional noise predictors eps_theta(x, t, class): a full-resolution ResNet and a
two-level UNet, built from 3x3 convolutions with zero or circular padding and no normalisation layers
(normalisation would couple distant pixels and break the locality the ELS machine models).

Models are saved as a plain state_dict in safetensors with their ModelConfig as JSON metadata (no
pickle), so a model file is self-describing: `save_model` / `load_model`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..io import write_safetensors

ARCHITECTURES = ("resnet", "unet")
PADDINGS = ("zeros", "circular")
MODEL_FORMAT = "els-cnn-model-1"
# t lies in [0, 1]; the sinusoidal features are taken of 1000 t so that the slowest frequencies still
# separate nearby reverse steps (t = i / 20) as in the usual integer-timestep embeddings.
TIME_FEATURE_SCALE = 1000.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a noise predictor.

    arch: 'resnet' (residual blocks at full resolution: receptive field 2 * (2 + 2 * num_blocks) + 1)
      or 'unet' (len(channel_mult) resolutions, i.e. len - 1 down/up levels, with skip connections).
    channels: base width; channel_mult: unet width multipliers per resolution (ignored by the resnet).
    num_blocks: resnet: residual blocks; unet: blocks per resolution.
    num_classes: class labels 0..num_classes-1; label num_classes (or None) is the unconditional token.
    padding: 'zeros' or 'circular', used by every convolution (the machine follows it: bbELS / ELS).
    """

    arch: str = "resnet"
    in_channels: int = 1
    channels: int = 32
    num_blocks: int = 4
    channel_mult: tuple[int, ...] = (1, 2, 2)
    emb_dim: int = 64
    num_classes: int = 10
    padding: str = "zeros"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch {self.arch!r}: expected one of {ARCHITECTURES}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding {self.padding!r}: expected one of {PADDINGS}")
        for name in ("in_channels", "channels", "num_blocks", "emb_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        if self.arch == "unet" and (len(self.channel_mult) < 2 or min(self.channel_mult) < 1):
            raise ValueError(f"unet channel_mult needs >= 2 positive entries: {self.channel_mult}")

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def machine(self) -> str:
        """The ELS machine that models this CNN: zero padding -> bbELS, circular -> ELS."""
        return "bbels" if self.padding == "zeros" else "els"


def conv3x3(c_in: int, c_out: int, padding_mode: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode=padding_mode)


def sinusoidal_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] times in [0, 1] -> [B, dim] sin/cos features (dim even; an odd dim gets a zero column)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half
    )
    angles = TIME_FEATURE_SCALE * t[:, None] * freqs[None, :]
    out = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(out, (0, dim - 2 * half))


class Conditioning(nn.Module):
    """Time embedding (sinusoidal features -> MLP) plus a learned class embedding."""

    def __init__(self, emb_dim: int, num_classes: int):
        super().__init__()
        self.emb_dim = emb_dim
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # the extra row is the unconditional token, so one model can also sample without a class
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            labels = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        return self.time_mlp(sinusoidal_features(t, self.emb_dim)) + self.class_emb(labels)


class ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)) + emb)): two 3x3 convs, the embedding added in between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, padding_mode: str):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, padding_mode)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.conv2 = conv3x3(c_out, c_out, padding_mode)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x)) + self.emb_proj(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


def _time_tensor(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t as a [B] tensor of x's dtype and device (a float is broadcast to the batch)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


class NoisePredictor(nn.Module):
    """Common interface: forward(x [B, C, H, W], t ([B] or float in [0, 1]), labels [B] long | None)
    -> predicted noise eps [B, C, H, W]."""

    config: ModelConfig

    def embed(self, x, t, labels) -> torch.Tensor:
        return self.cond(_time_tensor(t, x), labels)


class ResNetDenoiser(NoisePredictor):
    """conv_in -> num_blocks residual blocks at full resolution -> SiLU -> conv_out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, pad = config.channels, config.padding
        self.cond = Conditioning(config.emb_dim, config.num_classes)
        self.conv_in = conv3x3(config.in_channels, c, pad)
        self.blocks = nn.ModuleList(
            ResBlock(c, c, config.emb_dim, pad) for _ in range(config.num_blocks)
        )
        self.conv_out = conv3x3(c, config.in_channels, pad)

    def forward(self, x, t, labels=None):
        emb = self.embed(x, t, labels)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(h))


class UNetDenoiser(NoisePredictor):
    """A small UNet: residual blocks per resolution, stride-2 conv down, nearest-upsample + conv up,
    skip connections concatenated on the way up. H and W must be divisible by 2^(levels - 1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        pad, emb = config.padding, config.emb_dim
        widths = [config.channels * m for m in config.channel_mult]
        self.cond = Conditioning(emb, config.num_classes)
        self.conv_in = conv3x3(config.in_channels, widths[0], pad)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = widths[0]
        for level, w in enumerate(widths):
            blocks = []
            for _ in range(config.num_blocks):
                blocks.append(ResBlock(c, w, emb, pad))
                c = w
            self.down_blocks.append(nn.ModuleList(blocks))
            if level < len(widths) - 1:
                self.downsample.append(conv3x3(w, w, pad, stride=2))
        self.mid = ResBlock(c, c, emb, pad)
        self.upsample = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            if level < len(widths) - 1:
                self.upsample.append(conv3x3(c, c, pad))
            blocks = [ResBlock(c + w, w, emb, pad)]
            blocks += [ResBlock(w, w, emb, pad) for _ in range(config.num_blocks - 1)]
            self.up_blocks.append(nn.ModuleList(blocks))
            c = w
        self.conv_out = conv3x3(c, config.in_channels, pad)

    def forward(self, x, t, labels=None):
        levels = len(self.down_blocks)
        factor = 2 ** (levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"unet with {levels} resolutions needs H, W divisible by {factor}")
        emb = self.embed(x, t, labels)
        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < levels - 1:
                h = self.downsample[level](h)
        h = self.mid(h, emb)
        for i, blocks in enumerate(self.up_blocks):
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips[levels - 1 - i]], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(F.silu(h))


def build_model(config: ModelConfig, *, seed: int | None = None) -> NoisePredictor:
    """A freshly initialised model; with a seed the initial weights do not depend on global RNG."""
    cls = ResNetDenoiser if config.arch == "resnet" else UNetDenoiser
    if seed is None:
        return cls(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def receptive_field(config: ModelConfig) -> int | None:
    """Receptive field (pixels across) of the ResNet: every 3x3 conv adds 2; None for the UNet."""
    if config.arch != "resnet":
        return None
    return 1 + 2 * (2 + 2 * config.num_blocks)


def save_model(
    path: str | Path, model: NoisePredictor, metadata: dict[str, str] | None = None
) -> None:
    """state_dict -> safetensors, ModelConfig (and any extra string metadata) in the header; atomic."""
    path = Path(path)
    meta = {"format": MODEL_FORMAT, "model_config": model.config.to_json(), **(metadata or {})}
    write_safetensors(path, model.state_dict(), meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_model(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> NoisePredictor:
    """Rebuild the model from its saved config and load the weights (strict), in eval mode."""
    meta = read_metadata(path)
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not an ELS CNN model file (format {meta.get('format')!r})")
    config = ModelConfig.from_dict(json.loads(meta["model_config"]))
    model = build_model(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device=device, dtype=dtype).eval()
