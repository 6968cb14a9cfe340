rule convert:
    input: **stage_input("convert")
    output: stage_output("convert")
    params: values=stage_params("convert")
    log: STAGES["convert"].log
    conda: "../envs/detpipe.yaml"
    shell: stage_shell("convert")
