"""Rule prepare_data: els.data.prepare_dataset -> train.safetensors + meta.json of one input key."""

import json
import time

import torch

from els.config import log_to
from els.data import class_names, load_prepared, prepare_dataset
from els.inputs import manifest
from els.io import read_json, write_json

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    data = json.loads(snakemake.resources.els_data)
    start = time.perf_counter()
    metadata = prepare_dataset(
        snakemake.params.dataset,
        data["root"],
        snakemake.output.train,
        channels=snakemake.params.channels,
        folder=snakemake.resources.els_folder or None,
        local_dirs=data["local_dirs"],
        allow_download=data["allow_download"],
        allow_apt=data["allow_apt"],
        prefer_local=data["prefer_local"],
    )
    if snakemake.params.dataset == "imagefolder":
        # the files read must be the ones the manifest (this job's input) pinned at start-up
        folder = snakemake.resources.els_folder
        entry = {"source": "imagefolder", "path": folder, "channels": snakemake.params.channels}
        now = manifest(snakemake.wildcards.dataset, entry)
        if now != read_json(snakemake.input.manifest):
            raise RuntimeError(
                f"the image folder {folder} changed while the workflow "
                "ran; run it again to prepare the new files"
            )
    images, labels = load_prepared(snakemake.output.train)
    names = class_names(snakemake.output.train)
    meta = {
        **{k: v for k, v in metadata.items() if k not in ("class_names", "raw_files")},
        "name": snakemake.wildcards.dataset,
        "input_key": snakemake.wildcards.key,
        "class_names": names,
        "raw_files": json.loads(metadata["raw_files"]),
        "shape": list(images.shape),
        "images_per_class": {str(c): int((labels == c).sum()) for c in range(len(names))},
    }
    # no timing in the outputs (they are byte-identical across runs): it goes to the log
    write_json(snakemake.output.meta, meta)
    print(
        f"{snakemake.wildcards.dataset}: {images.shape[0]} images, {len(names)} classes, "
        f"prepared in {time.perf_counter() - start:.1f} s"
    )
