# The CNN comparison (Kamb & Ganguli's central claim): train a noise predictor, calibrate the
# machine's patch size per step against it, sample both (and the ideal score) from the same noise,
# and correlate the samples seed for seed. Active only when the config has a `cnn:` section:
#
#     if config.get("cnn"):
#         include: "rules/cnn.smk"
#
# Every rule calls into els.cnn.stages; input functions are in els/cnn/workflow.py; outputs live
# under results/cnn/{dataset}/{model}/.

from els.cnn.workflow import CNN_ROOT, CnnRules

CNN_RULES = CnnRules(config.get("cnn"), config, WORKFLOW_DIR, SAMPLE)


wildcard_constraints:
    model="[A-Za-z0-9_.-]+",


rule cnn_all:
    input:
        CNN_RULES.targets(),


rule train_cnn:
    input:
        data=CNN_RULES.prepared_data,
    output:
        model=f"{CNN_ROOT}/model.safetensors",
        # what produced the weights: settings, steps, wall time, machine, code, sha256
        provenance=f"{CNN_ROOT}/model.json",
        loss_csv=f"{CNN_ROOT}/loss.csv",
        loss_png=report(
            f"{CNN_ROOT}/loss.png",
            caption="../report/cnn_loss.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
    log:
        "logs/train_cnn/{dataset}/{model}.log",
    benchmark:
        "logs/benchmarks/train_cnn/{dataset}/{model}.tsv"
    conda:
        "../envs/els.yaml"
    threads: CNN_RULES.resource("train", "threads")
    resources:
        mem_mb=CNN_RULES.resource("train", "mem_mb"),
        runtime=CNN_RULES.resource("train", "runtime"),
        gpu=CNN_RULES.gpu,
    params:
        cnn=CNN_RULES.params("train"),
        # checkpoints and the running loss log, kept out of the outputs so that a failed or
        # interrupted job resumes where it stopped instead of starting over
        work_dir=f"{CNN_ROOT}/train_work",
    script:
        "../scripts/cnn_train.py"


rule calibrate_schedule:
    input:
        data=CNN_RULES.prepared_data,
        model=CNN_RULES.model_file,
    output:
        scales=f"{CNN_ROOT}/scales.txt",
        table=f"{CNN_ROOT}/calibration.csv",
        figure=report(
            f"{CNN_ROOT}/calibration.png",
            caption="../report/cnn_calibration.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
    log:
        "logs/calibrate_schedule/{dataset}/{model}.log",
    benchmark:
        "logs/benchmarks/calibrate_schedule/{dataset}/{model}.tsv"
    conda:
        "../envs/els.yaml"
    threads: CNN_RULES.resource("calibrate", "threads")
    resources:
        mem_mb=CNN_RULES.resource("calibrate", "mem_mb"),
        runtime=CNN_RULES.resource("calibrate", "runtime"),
        gpu=CNN_RULES.gpu,
    params:
        cnn=CNN_RULES.params("calibrate"),
    script:
        "../scripts/cnn_calibrate.py"


rule sample_cnn:
    input:
        model=CNN_RULES.model_file,
    output:
        samples=f"{CNN_ROOT}/samples/cnn/{{cls}}.safetensors",
    log:
        "logs/sample_cnn/{dataset}/{model}/{cls}.log",
    benchmark:
        "logs/benchmarks/sample_cnn/{dataset}/{model}/{cls}.tsv"
    conda:
        "../envs/els.yaml"
    threads: CNN_RULES.resource("sample", "threads")
    resources:
        mem_mb=CNN_RULES.resource("sample", "mem_mb"),
        runtime=CNN_RULES.resource("sample", "runtime"),
        gpu=CNN_RULES.gpu,
    params:
        cnn=CNN_RULES.params("sample"),
    script:
        "../scripts/cnn_sample.py"


rule sample_machines_cnn:
    input:
        data=CNN_RULES.prepared_data,
        scales=CNN_RULES.scales_file,
    output:
        samples=f"{CNN_ROOT}/samples/machines/{{cls}}.safetensors",
    log:
        "logs/sample_machines_cnn/{dataset}/{model}/{cls}.log",
    benchmark:
        "logs/benchmarks/sample_machines_cnn/{dataset}/{model}/{cls}.tsv"
    conda:
        "../envs/els.yaml"
    threads: CNN_RULES.resource("sample", "threads")
    resources:
        mem_mb=CNN_RULES.resource("sample", "mem_mb"),
        runtime=CNN_RULES.resource("sample", "runtime"),
        gpu=CNN_RULES.gpu,
    params:
        cnn=CNN_RULES.params("sample"),
    script:
        "../scripts/cnn_sample_machines.py"


rule evaluate_r2:
    input:
        cnn=CNN_RULES.per_class(f"{CNN_ROOT}/samples/cnn/{{cls}}.safetensors"),
        machines=CNN_RULES.machine_samples,
    output:
        table=f"{CNN_ROOT}/r2.csv",
        summary=report(
            f"{CNN_ROOT}/r2_summary.csv",
            caption="../report/cnn_r2_summary.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
        machines=f"{CNN_ROOT}/r2_machines.csv",
        paper=report(
            f"{CNN_ROOT}/r2_paper.csv",
            caption="../report/cnn_r2_paper.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
        scatter=report(
            f"{CNN_ROOT}/r2_scatter.png",
            caption="../report/cnn_r2_scatter.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
        grid=report(
            f"{CNN_ROOT}/samples_grid.png",
            caption="../report/cnn_samples_grid.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
    log:
        "logs/evaluate_r2/{dataset}/{model}.log",
    benchmark:
        "logs/benchmarks/evaluate_r2/{dataset}/{model}.tsv"
    conda:
        "../envs/els.yaml"
    threads: CNN_RULES.resource("evaluate", "threads")
    resources:
        mem_mb=CNN_RULES.resource("evaluate", "mem_mb"),
        runtime=CNN_RULES.resource("evaluate", "runtime"),
    params:
        cnn=CNN_RULES.params("evaluate"),
        # a shipped model is compared with the pipeline's own samples (CnnRules.machine_samples)
        pipeline_samples=lambda wc: CNN_RULES.shipped(wc.model),
    script:
        "../scripts/cnn_evaluate.py"


rule cnn_schedule_figure:
    input:
        scales=CNN_RULES.scales_file,
        reference=CNN_RULES.reference_schedule(),
    output:
        figure=report(
            f"{CNN_ROOT}/schedule.png",
            caption="../report/cnn_schedule.rst",
            category="CNN comparison",
            subcategory="{model}",
        ),
    log:
        "logs/cnn_schedule_figure/{dataset}/{model}.log",
    conda:
        "../envs/els.yaml"
    threads: CNN_RULES.resource("evaluate", "threads")
    resources:
        mem_mb=CNN_RULES.resource("evaluate", "mem_mb"),
        runtime=CNN_RULES.resource("evaluate", "runtime"),
    params:
        cnn=CNN_RULES.params("evaluate"),
    script:
        "../scripts/cnn_schedule_figure.py"
