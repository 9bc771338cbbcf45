"""Rule train_cnn: train (or resume) the CNN; see els.cnn.stages.stage_train."""

import json
import sys

import torch

from els.cnn import stages
from els.cnn.provenance import write_provenance

with open(snakemake.log[0], "w") as log:
    sys.stderr = log  # the progress bar and warnings go to the job's log
    torch.set_num_threads(snakemake.threads)
    settings = stages.job_settings(
        snakemake.params.cnn,
        snakemake.wildcards.model,
        snakemake.wildcards.dataset,
        data_path=snakemake.input.data,
    )
    info = stages.stage_train(
        settings,
        snakemake.input.data,
        snakemake.params.work_dir,
        snakemake.output.model,
        snakemake.output.loss_csv,
        snakemake.output.loss_png,
        progress=True,
    )
    write_provenance(
        snakemake.output.provenance,
        snakemake.output.model,
        settings,
        info,
        device=str(settings.torch_device()),
    )
    print(json.dumps(info), file=log)
