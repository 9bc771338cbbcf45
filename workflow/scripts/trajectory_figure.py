"""Rule trajectory_figure: x and the predicted clean image at every reverse step, with t and k."""

from els.config import log_to
from els.figures import machine_label, trajectory_figure
from els.io import read_sample

with log_to(snakemake.log[0]):
    wc = snakemake.wildcards
    sample = read_sample(snakemake.input.sample)
    if sample.trajectory_x is None:
        raise ValueError(
            f"{snakemake.input.sample} holds no trajectory (sampling.trajectory was false when "
            "it was sampled); delete it or set sampling.trajectory: false"
        )
    trajectory_figure(
        snakemake.output[0],
        sample.t,
        sample.k,
        sample.trajectory_x,
        sample.trajectory_denoised,
        noise=sample.noise,
        title=f"{wc.dataset} {machine_label(wc.machine)}, class {wc.cls}, seed {wc.seed}",
    )
