import sys

from medim.cli import main

sys.exit(main())
