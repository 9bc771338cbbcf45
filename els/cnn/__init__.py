"""Trained CNN diffusion models against the ELS machine (the paper's central comparison).

- models: class-conditional ResNet / UNet noise predictors (zero or circular padding, no norm layers),
  saved as safetensors state_dicts with their config;
- train: epsilon-prediction training with the legacy cosine schedule, AdamW, exponential LR decay,
  checkpoints with exact resumption, loss log (CSV + plot);
- sample: CNN sampling with the machines' deterministic reverse process, trajectory recording;
- calibrate: the per-step patch size whose machine score is closest (cosine) to the CNN's score;
- evaluate: per-seed Pearson r / r^2 of CNN vs machine samples, summary tables, figures.
"""

from .calibrate import (
    DEFAULT_PATCH_SIZES,
    Calibration,
    calibrate,
    cosine_per_sample,
    machine_cosines,
)
from .evaluate import pearson_r, plot_r2_scatter, plot_sample_grid, r2_table, summarize
from .models import (
    ModelConfig,
    NoisePredictor,
    ResNetDenoiser,
    UNetDenoiser,
    build_model,
    load_model,
    parameter_count,
    receptive_field,
    save_model,
)
from .sample import CnnTrajectory, cnn_score, predict_noise, sample_cnn
from .train import TrainConfig, TrainResult, plot_loss, train_noise_predictor

__all__ = [
    "DEFAULT_PATCH_SIZES",
    "Calibration",
    "CnnTrajectory",
    "ModelConfig",
    "NoisePredictor",
    "ResNetDenoiser",
    "TrainConfig",
    "TrainResult",
    "UNetDenoiser",
    "build_model",
    "calibrate",
    "cnn_score",
    "cosine_per_sample",
    "load_model",
    "machine_cosines",
    "parameter_count",
    "pearson_r",
    "plot_loss",
    "plot_r2_scatter",
    "plot_sample_grid",
    "predict_noise",
    "r2_table",
    "receptive_field",
    "sample_cnn",
    "save_model",
    "summarize",
    "train_noise_predictor",
]
