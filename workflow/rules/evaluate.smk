rule evaluate:
    input: **stage_input("evaluate")
    output: stage_output("evaluate")
    params: values=stage_params("evaluate")
    log: STAGES["evaluate"].log
    conda: "../envs/detpipe.yaml"
    shell: stage_shell("evaluate")
