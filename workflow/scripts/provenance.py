"""Rule provenance: one seed's provenance out of its batch file -> tensors, mosaic numbers, figure."""

import json

from els.config import log_to
from els.data import load_prepared
from els.figures import machine_label, plot_provenance
from els.io import read_safetensors, write_json, write_safetensors
from els.provenance import mosaic_summary

NAMES = ("source_image", "source_row", "source_col", "source_weight", "n_eff")

with log_to(snakemake.log[0]):
    wc = snakemake.wildcards
    tensors, meta = read_safetensors(snakemake.input.batch)
    if "provenance_n_eff" not in tensors:
        raise ValueError(
            f"{snakemake.input.batch} holds no provenance (sampling.provenance was false when it "
            "was sampled); delete it to resample, or set sampling.provenance: false"
        )
    i = json.loads(meta["seeds"]).index(int(wc.seed))
    prov = {name: tensors[f"provenance_{name}"][i].contiguous() for name in NAMES}
    t, k = json.loads(meta["t"]), json.loads(meta["k"])
    write_safetensors(
        snakemake.output.provenance,
        prov,
        {"format": "els.provenance", "t": meta["t"], "k": meta["k"], "seed": wc.seed},
    )
    numbers = mosaic_summary(prov["source_image"], prov["source_weight"])
    write_json(
        snakemake.output.summary,
        {"dataset": wc.dataset, "machine": wc.machine, "class": wc.cls, "seed": int(wc.seed)}
        | numbers,
    )
    cls = None if wc.cls == "all" else int(wc.cls)
    # source_image indexes the training images the index was built from: the same selection
    train, _ = load_prepared(
        snakemake.input.train, cls=cls, max_per_class=snakemake.params.max_train_per_class
    )
    plot_provenance(
        snakemake.output.figure,
        tensors["image"][i],
        prov["source_image"],
        prov["source_row"],
        prov["source_col"],
        prov["source_weight"],
        prov["n_eff"],
        t,
        k,
        train,
        title=f"{wc.dataset} {machine_label(wc.machine)}, class {wc.cls}, seed {wc.seed}: "
        f"{numbers['n_sources']} source images, top one {100 * numbers['top_source_share']:.0f}% "
        "of pixels",
    )
    print(json.dumps(numbers))
