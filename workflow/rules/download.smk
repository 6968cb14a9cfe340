rule download:
    input: stage_input("download")
    output: stage_output("download")
    params: values=stage_params("download")
    shell: STAGES["download"].cmd
