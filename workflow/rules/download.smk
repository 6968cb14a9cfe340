rule download:
    input: **stage_input("download")
    output: stage_output("download")
    params: values=stage_params("download")
    log: STAGES["download"].log
    conda: "../envs/detpipe.yaml"
    shell: stage_shell("download")
