rule report:
    input: **stage_input("report")
    output: stage_output("report")
    params: values=stage_params("report")
    log: STAGES["report"].log
    conda: "../envs/detpipe.yaml"
    shell: stage_shell("report")
