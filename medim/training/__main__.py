"""`torchrun --nproc_per_node N -m medim.training --config cfg.yaml [section.key=value ...]`"""

import sys

from medim.cli import main

sys.exit(main(["-v", "train", *sys.argv[1:]]))
