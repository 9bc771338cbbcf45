"""Rule sample_seed: one seed's tensors and metadata out of its batch file -> seed file + PNG."""

import json

from els.config import log_to
from els.io import read_safetensors, write_png, write_sample

with log_to(snakemake.log[0]):
    tensors, meta = read_safetensors(snakemake.input.batch)
    seeds = json.loads(meta["seeds"])
    seed = int(snakemake.wildcards.seed)
    i = seeds.index(seed)
    per_seed = {k: v for k, v in meta.items() if k not in ("format", "seeds", "noise_keys")}
    write_sample(
        snakemake.output.sample,
        noise=tensors["noise"][i],
        image=tensors["image"][i],
        trajectory_x=tensors["trajectory_x"][i] if "trajectory_x" in tensors else None,
        trajectory_denoised=(
            tensors["trajectory_denoised"][i] if "trajectory_denoised" in tensors else None
        ),
        metadata={
            **per_seed,
            "seed": str(seed),
            "noise_key": json.loads(meta["noise_keys"])[i],
            "batch_seeds": meta["seeds"],
            "batch_file": str(snakemake.input.batch),
        },
    )
    write_png(snakemake.output.png, tensors["image"][i])
    print(f"seed {seed} (entry {i} of batch {seeds}) -> {snakemake.output.sample}")
