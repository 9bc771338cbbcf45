"""Rule build_index: load the class's training images, els.PatchIndex.build for the schedule's
patch sizes, save."""

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
    index = els.PatchIndex.build(images, wc.machine, list(snakemake.params.ks))
    index.save(snakemake.output.index)  # atomic (temporary file, then rename)
    print(
        f"{wc.dataset} {wc.machine} class {wc.cls} k={list(index.ks)}: {images.shape[0]} "
        f"training images, {time.perf_counter() - start:.1f} s"
    )
