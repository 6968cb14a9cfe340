# `snakemake --cores 1 report` runs download -> convert -> train -> evaluate -> report on params/detpipe.yaml.
# Stage inputs, outputs and params live in detpipe/pipeline.py, which also generates dvc.yaml.

include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"

localrules: all


rule all:
    default_target: True
    input: STAGES["report"].outs
