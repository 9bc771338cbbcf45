"""Rule finish_seed: one seed's files out of its batch (els.seed_files): sample + PNG, nearest
training images, pair figure, and the trajectory figure and provenance where the config asks."""

import json

from els.config import log_to
from els.data import class_names, load_prepared
from els.neighbours import training_subset
from els.seed_files import (
    BatchEntry,
    SeedKey,
    write_neighbours,
    write_pair_figure,
    write_provenance,
    write_seed_sample,
    write_trajectory_figure,
)

with log_to(snakemake.log[0]):
    wc, out = snakemake.wildcards, snakemake.output
    key = SeedKey(wc.dataset, wc.machine, wc.cls, int(wc.seed))
    entry = BatchEntry.read(snakemake.input.batch, key.seed)
    write_seed_sample(out, entry, key)
    train, labels = load_prepared(snakemake.input.train)
    max_per_class = snakemake.params.max_train_per_class
    image, names = entry.get("image"), class_names(snakemake.input.train)
    nn = write_neighbours(out, image, train, labels, names, key, max_per_class)
    write_pair_figure(out.pair, image, train, nn, key)
    print(json.dumps(nn))
    if "trajectory" in out.keys():
        write_trajectory_figure(out.trajectory, entry, key)
    if "provenance" in out.keys():
        # source_image indexes the images the machine was built from: the same selection
        used = training_subset(labels, key.class_id, max_per_class)
        print(json.dumps(write_provenance(out, entry, train[used], key)))
    print(f"seed {key.seed} (entry {entry.i} of batch {entry.meta['seeds']}) -> {out.sample}")
