"""The generation tasks by name: the short name `medim generate` and `pipe(task, ...)` accept -> the
pipeline method that runs it. Kept free of torch so the command line's `--help` stays fast."""

TASKS = {"image": "text_to_image", "report": "image_to_report", "pairs": "generate_pairs", "inpaint": "inpaint"}
