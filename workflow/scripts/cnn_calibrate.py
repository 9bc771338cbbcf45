"""Rule calibrate_schedule: the machine's patch size per step, fitted to the CNN's score;
see els.cnn.stages.stage_calibrate."""

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
    scales = stages.stage_calibrate(
        settings,
        snakemake.input.data,
        snakemake.input.model,
        snakemake.output.scales,
        snakemake.output.table,
        snakemake.output.figure,
        progress=True,
    )
    print("calibrated schedule:", " ".join(map(str, scales)), file=log)
