"""Rule sample_batch: load the index (or, for a zoo denoiser, the class's statistics), noise per
seed, one els.sample call for the whole batch."""

import json
import time

import torch

import els
from els.config import (
    has_provenance,
    log_to,
    resolve_device,
    resolve_dtype,
    seeds_of_batch,
    uses_stats,
)
from els.data import load_prepared
from els.io import write_safetensors
from els.noise import noise_for, noise_key
from els.provenance import stack_provenance
from els.scales import read_scales

with log_to(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    wc = snakemake.wildcards
    device = resolve_device(snakemake.resources.els_device)
    dtype = resolve_dtype(snakemake.params.dtype)
    scales = read_scales(snakemake.input.schedule)
    seeds = seeds_of_batch(wc.batch)
    index, zoo_options = None, {}
    if uses_stats(wc.machine):
        # a zoo denoiser (els.zoo): the class's statistics, checked against its training images;
        # scfdm's smoothing noise keyed like the starting noise, so batching cannot change a seed
        cls = None if wc.cls == "all" else int(wc.cls)
        train, _ = load_prepared(
            snakemake.input.train, cls=cls, max_per_class=snakemake.params.max_train_per_class
        )
        source = els.ZooStats.load(snakemake.input.stats, images=train)
        zoo_options = {
            "stats": source,
            "keys": [noise_key(wc.dataset, wc.cls, s) for s in seeds],
            "memory_budget": int(float(snakemake.resources.els_memory_budget_gb) * 2**30),
            **snakemake.params.zoo,
        }
    else:
        source = index = els.PatchIndex.load(snakemake.input.index, machine=wc.machine)
    shape = source.images.shape  # [N, C, H, W]
    noise = torch.stack([noise_for(wc.dataset, wc.cls, s, shape[1:]) for s in seeds])
    provenance = snakemake.params.provenance and has_provenance(wc.machine)
    print(
        f"{wc.dataset} {wc.machine} class {wc.cls} seeds {seeds}: {shape[0]} training images, "
        f"schedule {snakemake.input.schedule} {scales}, device {device}, {snakemake.threads} threads"
    )
    start = time.perf_counter()
    images, trajectory = els.sample(
        wc.machine,
        None,
        scales,
        noise,
        index=index,
        device=device,
        dtype=dtype,
        return_trajectory=True,
        provenance=provenance,
        disable=False,  # tqdm bar in the log
        **zoo_options,
    )
    runtime = time.perf_counter() - start
    tensors = {"noise": noise, "image": images.float().cpu()}
    if snakemake.params.trajectory:
        tensors["trajectory_x"] = torch.stack(trajectory.x, dim=1).float()  # [B, S, C, H, W]
        tensors["trajectory_denoised"] = torch.stack(trajectory.denoised, dim=1).float()
    if provenance:
        for name, value in stack_provenance(trajectory.provenance).items():
            # n_eff is [steps, B, H, W]: batch first like every other tensor here
            value = value.transpose(0, 1) if name == "n_eff" else value
            tensors[f"provenance_{name}"] = value.contiguous()
    write_safetensors(
        snakemake.output.batch,
        tensors,
        {
            "format": "els.sample_batch",
            "dataset": wc.dataset,
            "machine": wc.machine,
            "class": wc.cls,
            "seeds": json.dumps(seeds),
            "noise_keys": json.dumps([noise_key(wc.dataset, wc.cls, s) for s in seeds]),
            "t": json.dumps(trajectory.t),
            "k": json.dumps(trajectory.k),
            "device": str(device),
            "dtype": snakemake.params.dtype,
            "threads": str(snakemake.threads),
            "els_version": els.__version__,
            "torch_version": torch.__version__,
            "schedule": str(snakemake.input.schedule),
            "schedule_scales": json.dumps(scales),
            "max_train_per_class": json.dumps(snakemake.params.max_train_per_class),
            "n_train": str(shape[0]),
            "index_fingerprint": source.fingerprint,
        }
        | ({"zoo_params": json.dumps(snakemake.params.zoo, sort_keys=True)} if zoo_options else {}),
    )
    # the sampling time is only logged (and in the rule benchmark): outputs hold no timings, so
    # every run of the same config writes the same bytes
    print(f"sampled {len(seeds)} seeds in {runtime:.1f} s")
