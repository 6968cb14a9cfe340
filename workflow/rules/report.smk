# The page and its figures are marked with report(): `snakemake --report report.html` (after a run) builds
# Snakemake's own report of the run with them (docs/pipeline.md). Paths come from the stage table.
PAGE, FIGURES = STAGES["report"].outs


rule report:
    input: **stage_input("report")
    output:
        report(PAGE, caption="../report/page.rst", category="detpipe report"),
        report(directory(FIGURES), patterns=["{name}.png", "{name}.jpg"], caption="../report/figures.rst",
               category="Figures"),
    params: values=stage_params("report")
    threads: stage_threads("report")
    resources: **stage_resources("report")
    log: STAGES["report"].log
    conda: "../envs/detpipe.yaml"
    shell: stage_shell("report")
