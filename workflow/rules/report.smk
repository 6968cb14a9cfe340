rule report:
    input: stage_input("report")
    output: stage_output("report")
    params: values=stage_params("report")
    shell: STAGES["report"].cmd
