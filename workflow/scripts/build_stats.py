"""Rule build_stats: load the class's training images, els.ZooStats.build, save."""

import json
import time

import torch

import els
from els.config import log_to
from els.data import load_prepared

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    wc = snakemake.wildcards
    cls = None if wc.cls == "all" else int(wc.cls)
    images, _ = load_prepared(
        snakemake.input.train, cls=cls, max_per_class=snakemake.params.max_train_per_class
    )
    start = time.perf_counter()
    stats = els.ZooStats.build(images)
    stats.save(  # atomic (temporary file, then rename)
        snakemake.output.stats,
        {
            "dataset": wc.dataset,
            "class": wc.cls,
            "max_train_per_class": json.dumps(snakemake.params.max_train_per_class),
        },
    )
    print(
        f"{wc.dataset} class {wc.cls}: {images.shape[0]} training images, n = {stats.dim}, "
        f"{int((stats.eigvals > 0).sum())} positive eigenvalues, "
        f"{time.perf_counter() - start:.1f} s"
    )
