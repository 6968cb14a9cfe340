rule convert:
    input: stage_input("convert")
    output: stage_output("convert")
    params: values=stage_params("convert")
    shell: STAGES["convert"].cmd
