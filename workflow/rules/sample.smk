# Stage 3: sampling. A batch job samples every seed of an aligned block of sampling.batch_seeds seeds
# (batch 'seeds0-1', 'seeds2-3', ...) of one (dataset, machine, class) in a single els.sample call;
# finish_seed (seed.smk) then writes each seed's files in the stable layout. Noise comes from
# els.noise.noise_for(dataset, class, seed) only. See els/config.py for why blocks are sampled whole.


rule sample_batch:
    input:
        unpack(machine_inputs),
        schedule=schedule_of,
    output:
        batch=BATCH,
    log:
        "logs/sample_batch/{dataset}/{machine}/{cls}/{batch}.log",
    benchmark:
        BATCH_BENCHMARK
    conda:
        "../envs/els.yaml"
    threads: stage("sample", "threads")
    resources:
        mem_mb=stage("sample", "mem_mb"),
        runtime=stage("sample", "runtime"),
        # how the job runs, never what it computes: as resources (not params) a change of
        # device or memory budget does not rerun the samples
        els_device=SAMPLING["device"],
        els_memory_budget_gb=str(SAMPLING["memory_budget_gb"]),
    params:
        dtype=SAMPLING["dtype"],
        trajectory=TRAJECTORY,
        provenance=PROVENANCE,
        max_train_per_class=lambda wc: dataset_config(wc).get("max_train_per_class"),
        zoo=lambda wc: plan.zoo_params(config, wc.machine),
    script:
        "../scripts/sample_batch.py"
