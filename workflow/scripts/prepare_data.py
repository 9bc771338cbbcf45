"""Rule prepare_data: els.data.prepare_dataset -> train.safetensors + meta.json."""

import json
import time

import torch

from els.config import log_to
from els.data import class_names, load_prepared, prepare_dataset
from els.io import write_json

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    data = snakemake.config.get("data", {})
    start = time.perf_counter()
    metadata = prepare_dataset(
        snakemake.params.dataset,
        data.get("root", "results/raw"),
        snakemake.output.train,
        channels=snakemake.params.channels,
        folder=snakemake.params.folder,
        local_dirs=data.get("local_dirs", ["/usr/share/datasets/fashion-mnist"]),
        allow_download=data.get("allow_download", True),
        allow_apt=data.get("allow_apt", True),
        prefer_local=data.get("prefer_local", False),
    )
    images, labels = load_prepared(snakemake.output.train)
    names = class_names(snakemake.output.train)
    meta = {
        **{k: v for k, v in metadata.items() if k not in ("class_names", "raw_files")},
        "name": snakemake.wildcards.dataset,
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
