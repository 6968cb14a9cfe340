rule train:
    input: stage_input("train")
    output: stage_output("train")
    params: values=stage_params("train")
    shell: STAGES["train"].cmd
