"""Rule sample_machines_cnn: the machine with the calibrated schedule and the ideal score, from the
same noise as the CNN samples, on the CNN's training images; see
els.cnn.stages.stage_sample_machines."""

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
        data_path=snakemake.input.data,
    )
    stages.stage_sample_machines(
        settings,
        snakemake.input.data,
        snakemake.input.scales,
        snakemake.wildcards.cls,
        snakemake.output.samples,
    )
