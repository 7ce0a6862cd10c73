"""Small utilities every layer uses: argument checks (`checks`), Hub and local files with atomic
writes (`hub`), which samples a torchrun rank makes (`sharding`) and the task names (`task_names`)."""
