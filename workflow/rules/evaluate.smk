rule evaluate:
    input: stage_input("evaluate")
    output: stage_output("evaluate")
    params: values=stage_params("evaluate")
    shell: STAGES["evaluate"].cmd
