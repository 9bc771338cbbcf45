# Stage 4: one job per seed writes every per-seed file out of the seed's sample batch: the sample
# (+ PNG), its nearest training images by pixel L2 distance (whole set and in its class), the pair
# figure, and (sampling.trajectory / sampling.provenance) the trajectory figure and the provenance.
# Machines without a dominant training image (wiener) use the rule without provenance outputs.


rule finish_seed:
    input:
        batch=batch_of_seed,
        train=TRAIN,
    output:
        **seed_outputs(PROVENANCE),
    log:
        "logs/finish_seed/{dataset}/{machine}/{cls}/seed{seed}.log",
    benchmark:
        "logs/benchmarks/finish_seed/{dataset}/{machine}/{cls}/seed{seed}.tsv"
    wildcard_constraints:
        machine="|".join(plan.PROVENANCE_MACHINES),
    conda:
        "../envs/els.yaml"
    threads: stage("seed", "threads")
    resources:
        mem_mb=stage("seed", "mem_mb"),
        runtime=stage("seed", "runtime"),
    params:
        max_train_per_class=lambda wc: dataset_config(wc).get("max_train_per_class"),
    script:
        "../scripts/finish_seed.py"


use rule finish_seed as finish_seed_without_provenance with:
    output:
        **seed_outputs(False),
    wildcard_constraints:
        machine="|".join(sorted(set(plan.MACHINES) - set(plan.PROVENANCE_MACHINES))),
