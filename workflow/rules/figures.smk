# Stage 5: what spans samples: the grids, the machine comparison and the summary table. Every
# figure (these and the per-seed ones of stage 4) goes into the report
# (snakemake --report results/report.html) with its caption from workflow/report/*.rst.


rule grid_figure:
    input:
        samples=grid_inputs,
        meta=META,
    output:
        report(
            GRID,
            caption="../report/grid.rst",
            category="{dataset} grids",
            labels={"machine": "{machine}"},
        ),
    log:
        "logs/grid_figure/{dataset}/{machine}.log",
    benchmark:
        "logs/benchmarks/grid_figure/{dataset}/{machine}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("figures", "threads")
    resources:
        mem_mb=stage("figures", "mem_mb"),
        runtime=stage("figures", "runtime"),
    params:
        classes=lambda wc: plan.class_labels(dataset_config(wc)),
        seeds=lambda wc: dataset_config(wc)["seeds"],
    script:
        "../scripts/grid_figure.py"


rule comparison_figure:
    input:
        unpack(comparison_inputs),
    output:
        report(
            COMPARISON,
            caption="../report/comparison.rst",
            category="{dataset} machine comparison",
            labels={"class": "{cls}", "seed": "{seed}"},
        ),
    log:
        "logs/comparison_figure/{dataset}/{cls}/seed{seed}.log",
    benchmark:
        "logs/benchmarks/comparison_figure/{dataset}/{cls}/seed{seed}.tsv"
    conda:
        "../envs/els.yaml"
    threads: stage("figures", "threads")
    resources:
        mem_mb=stage("figures", "mem_mb"),
        runtime=stage("figures", "runtime"),
    params:
        machines=lambda wc: plan.comparison(dataset_config(wc))[2],
    script:
        "../scripts/comparison_figure.py"


rule summary:
    input:
        samples=key_paths(SAMPLE, SAMPLES),
        neighbours=key_paths(NEIGHBOURS, SAMPLES),
        provenance=key_paths(PROVENANCE_JSON, PROVENANCE_SAMPLES) if PROVENANCE else [],
        # runtime_s comes from the batch jobs' benchmarks, so sample files stay free of timings
        timings=batch_benchmarks(SAMPLES),
    output:
        report(SUMMARY, caption="../report/summary.rst", category="Summary"),
    log:
        "logs/summary/summary.log",
    benchmark:
        "logs/benchmarks/summary/summary.tsv"
    conda:
        "../envs/els.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/summary.py"
