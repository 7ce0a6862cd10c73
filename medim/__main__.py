"""`python -m medim`: the same as the `medim` command."""

import sys

from medim.cli import main

sys.exit(main())
