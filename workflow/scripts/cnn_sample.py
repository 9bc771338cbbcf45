"""Rule sample_cnn: CNN samples of one class from the evaluation seeds' noise;
see els.cnn.stages.stage_sample_cnn."""

import sys

import torch

from els.cnn import stages

with open(snakemake.log[0], "w") as log:
    sys.stderr = log
    torch.set_num_threads(snakemake.threads)
    settings = stages.job_settings(
        snakemake.params.cnn,
        snakemake.wildcards.model,
        snakemake.wildcards.dataset,
        model_path=snakemake.input.model,
    )
    stages.stage_sample_cnn(
        settings, snakemake.input.model, snakemake.wildcards.cls, snakemake.output.samples
    )
