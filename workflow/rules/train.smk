rule train:
    input: **stage_input("train")
    output: stage_output("train")
    params: values=stage_params("train")
    log: STAGES["train"].log
    conda: "../envs/detpipe.yaml"
    shell: stage_shell("train")
